"""The official ``gradiend`` package trained offline on mechbias' texts (tiny model): its gradients and its
trained encoder/decoder agree exactly with mechbias' reading of them (issue 16)."""

import os

import pytest
import torch
from gradiend import TextPredictionTrainer, TrainingArguments
from gradiend.trainer.text.prediction import dataset as gradiend_dataset
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from mechbias.apps.export import export_model
from mechbias.core.params import named_params
from mechbias.core.testing import tiny_model
from mechbias.data.axes import load_axis
from mechbias.data.prompts import tokenize
from mechbias.methods.gradiend import batch_gradient, param_set
from mechbias.methods.gradiend.package import PAD_TO, from_package, oriented, package_frame, package_speed


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = tiny_model(arch="llama", seed=0, tokenizer="smollm2")
    ps = param_set(model, "mlp")
    work = tmp_path_factory.mktemp("gradiend_pkg")
    export_model(model, None, work / "model")
    df = package_frame(model, "finance", "gender")
    ax = load_axis("gender")
    args = TrainingArguments(train_batch_size=8, eval_steps=1000, max_steps=2, num_train_epochs=1,
                             experiment_dir=str(work / "run"), source="factual", target="diff",
                             params=ps.names, max_seeds=1)
    with package_speed(gradiend_dataset.TextTrainingDataset, TokenizersBackend):
        tr = TextPredictionTrainer(model=str(work / "model"), data=df, target_classes=list(ax.groups), args=args)
        tr.train()
    return model, ps, df, tr.get_model()


def _package_gradient(mwg, ps, masked: str, label: str) -> torch.Tensor:
    """The gradient the package trains on for one row: its own training item through its base model."""
    ds = gradiend_dataset.TextTrainingDataset.__new__(gradiend_dataset.TextTrainingDataset)
    ds.tokenizer, ds.max_length, ds.is_decoder_only_model = mwg.tokenizer, PAD_TO, True
    ds.mask_token, ds.prediction_objective = None, None
    ds.mask_placeholder = gradiend_dataset.DEFAULT_DATASET_MASK_PLACEHOLDER
    item = ds._create_item(masked, label)
    ids, labels, att = (item[k].reshape(1, -1) for k in ("input_ids", "labels", "attention_mask"))
    base = mwg.base_model
    params = dict(base.named_parameters())
    for n, p in params.items():
        p.requires_grad_(n in ps.names)
        p.grad = None
    base(input_ids=ids, attention_mask=att, labels=labels).loss.backward()
    g = torch.cat([params[n].grad.reshape(-1) for n in ps.names]).float()
    for p in params.values():
        p.grad = None
    return g


def test_package_gradients_are_mechbias_gradients(trained):
    """With the filler token the package's training gradient is mechbias' gradient of the whole text;
    without it (the package's own convention) it is the gradient of the text minus its last token."""
    model, ps, df, mwg = trained
    tok = model.tokenizer
    for _, row in df.iloc[[0, 7, 40]].iterrows():
        text = row["masked"].replace(" .[MASK]", "")
        target = tok(row["label"], add_special_tokens=False)["input_ids"][0]
        ours = batch_gradient(model, ps, [text], [target])
        pkg = _package_gradient(mwg, ps, row["masked"], row["label"])
        assert _rel(pkg, ours) < 1e-4
        raw = _package_gradient(mwg, ps, text + "[MASK]", row["label"])
        head = text.rsplit(" ", 1)[0]
        assert len(tokenize(model, [head])[0]) == len(tokenize(model, [text])[0]) - 1
        assert _rel(raw, batch_gradient(model, ps, [head], [target])) < 1e-4
        assert _rel(raw, ours) > 0.1  # the two conventions differ on these texts


def test_package_model_reads_out_exactly(trained):
    """Encoder and decoder read into a GradiendResult give the package's own outputs."""
    model, ps, df, mwg = trained
    g_mod = mwg.gradiend
    assert list(g_mod.param_map) == ps.names
    live = named_params(model)
    res = from_package(g_mod, ps, "finance", "gender", param_sizes={n: live[n].numel() for n in g_mod.param_map})
    tok = model.tokenizer
    for _, row in df.iloc[[1, 30]].iterrows():
        text = row["masked"].replace(" .[MASK]", "")
        g = batch_gradient(model, ps, [text], [tok(row["label"], add_special_tokens=False)["input_ids"][0]])
        with torch.no_grad():
            theirs = float(g_mod.encoder(g.reshape(1, -1)).reshape(-1)[0])
        assert res.model.encode(g) == pytest.approx(theirs, abs=1e-5)
        flipped = oriented(res, -1.0)
        assert flipped.model.encode(g) == pytest.approx(-theirs, abs=1e-5)
    for h in (-1.0, 0.0, 1.0):
        with torch.no_grad():
            theirs = g_mod.decoder(torch.tensor([[h]])).reshape(-1).float()
        assert _rel(res.model.decode(h), theirs) < 1e-6
        assert _rel(oriented(res, -1.0).model.decode(-h), theirs) < 1e-6


def test_package_frame_splits_match_mechbias(trained):
    _model, _ps, df, _mwg = trained
    assert set(df["split"]) == {"train", "validation", "test"}
    # names never cross between the training splits and the held-out split
    assert not set(df.loc[df.split == "test", "name"]) & set(df.loc[df.split != "test", "name"])
    assert not set(df.loc[df.split == "test", "template"]) & set(df.loc[df.split != "test", "template"])
    assert (df["masked"].str.endswith(" .[MASK]")).all()
