"""`scalax convert` and `scalax generate` on checkpoints that `scalax train` made: transformers gives the
logits scalax gives; mistakes get one line and exit 2."""

import json
import os

import ml_collections
import numpy as np
import pytest

from scalax import cli
from scalax import config as config_lib
from scalax.models import apply
from scalax.models.generate import generate
from scalax.train.checkpoint import load_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def run_cli(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    import glob
    import sysconfig

    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:20]:
        (root / os.path.basename(path)).write_bytes(open(path, "rb").read())
    return str(root), str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_trained_checkpoint_exports_with_the_same_logits(family, corpus, tmp_path, capsys):
    root, cache = corpus
    run = str(tmp_path / "run")
    rc, _, err = run_cli(capsys, "train", f"--config=configs/{family}.py:size=tiny", f"--workdir={run}",
                         "--config.train.steps=20", "--config.optim.warmup_steps=2", "--config.train.eval_every=20",
                         "--config.train.checkpoint_every=20", "--config.train.batch_size=8",
                         "--config.train.seq_len=64", "--config.model.dtype=float32",
                         f"--config.data.corpus={root}", f"--config.data.cache_dir={cache}")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "convert", f"--from={run}", f"--to-hf={tmp_path / 'hf'}")
    assert rc == 0, err
    assert ("GPT2LMHeadModel" if family == "gpt" else "LlamaForCausalLM") in out
    config, params, where = load_params(run)
    assert where.endswith("step 20")
    model_cfg = config_lib.model_config(ml_collections.ConfigDict(config))
    tokens = np.random.default_rng(0).integers(0, model_cfg.vocab_size, (2, 48))
    ours = np.asarray(apply(model_cfg, params, tokens))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-4

    # ... and back: the Hugging Face directory becomes a scalax checkpoint that generates like the original.
    rc, _, err = run_cli(capsys, "convert", f"--from-hf={tmp_path / 'hf'}", f"--to={tmp_path / 'ckpt'}")
    assert rc == 0, err
    rc, out, err = run_cli(capsys, "generate", f"--checkpoint={tmp_path / 'ckpt'}", "--prompt=def f(x):",
                           "--prompt=import", "--max_tokens=12", "--json", f"--config.data.cache_dir={cache}")
    assert rc == 0, err
    lines = [json.loads(line) for line in out.strip().splitlines()]
    prompts = [list(b"def f(x):"), list(b"import")]
    expected = generate(model_cfg, params, prompts, 12, eos_id=258)
    assert [line["tokens"] for line in lines] == expected
    assert [line["prompt"] for line in lines] == ["def f(x):", "import"]


@pytest.mark.parametrize("case,words", [("missing", "no config.json"), ("arch", "unsupported architecture"),
                                        ("shape", "but config.json implies")])
def test_convert_errors_one_line(case, words, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    if case != "missing":
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=4, vocab_size=61)
        transformers.LlamaForCausalLM(config).save_pretrained(src)
        data = json.loads((src / "config.json").read_text())
        data.update({"architectures": ["MambaForCausalLM"]} if case == "arch" else {"hidden_size": 64})
        (src / "config.json").write_text(json.dumps(data))
    capsys.readouterr()  # transformers' own progress output while saving
    rc, _, err = run_cli(capsys, "convert", f"--from-hf={src}", f"--to={tmp_path / 'out'}")
    assert rc == cli.EXIT_USER_ERROR
    lines = err.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], err
