"""`data.tokenizer` as a Hugging Face tokenizer.json: encodes as `tokenizers` itself does, token for token; a model
trained with it generates text that decodes through the same file; its mistakes are one line."""

import json

import pytest
from ml_collections import ConfigDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from scalax import cli
from scalax import config as config_lib
from scalax.data import corpora, tokenizers
from scalax.errors import ConfigError
from scalax.scaling import runner
from tests.test_user_errors import one_line, run_cli

TEXTS = ["document 7: héllo wörld", "  two  spaces\tand a tab\n", "日本語のテキスト and ASCII", "emoji 🙂 x", ""]


def make_tokenizer_json(path, corpus_texts, eos="<|end_of_text|>", bos_template=False, vocab=400):
    """A byte-level BPE as a model's tokenizer.json: Llama 3's special-token names; with `bos_template`, a
    post-processor that adds <|begin_of_text|> as Llama 3's does."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", eos] if eos else ["<|begin_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts, trainer=trainer)
    if bos_template:
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(30):
        (root / f"doc{i:02d}.txt").write_text(f"document {i}: " + "héllo wörld, the quick brown fox. " * (i + 5))
    return root


def data_config(corpus, cache_dir, tokenizer, **changes) -> ConfigDict:
    cfg = dict(corpus=str(corpus), text_field="text", tokenizer=str(tokenizer), bpe_vocab_size=300,
               vocab_multiple=1, val_fraction=0.2, cache_dir=str(cache_dir), prefetch=4)
    cfg.update(changes)
    return ConfigDict(cfg)


@pytest.mark.parametrize("bos_template", [False, True])
def test_encoding_equals_tokenizers_own(tmp_path, corpus, bos_template):
    """Token for token the ids of `Tokenizer.from_file(...).encode(text)`; documents are joined with the file's own
    end-of-text token, so a post-processor's BOS is not added per document (encode with add_special_tokens=False,
    which for a file without a post-processor is the same as plain encode)."""
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    path = make_tokenizer_json(tmp_path / "llama3ish" / "tokenizer.json", texts + TEXTS, bos_template=bos_template)
    reference = Tokenizer.from_file(str(path))
    for spec in (path, path.parent):  # the file, or a model directory holding it
        tok = corpora.load_tokenizer(data_config(corpus, tmp_path / "cache", spec))
        assert tok.eos_id == reference.token_to_id("<|end_of_text|>") and tok.vocab_size == reference.get_vocab_size()
        for text in TEXTS:
            ids = [int(i) for i in tok.encode(text.encode())]
            assert ids == reference.encode(text, add_special_tokens=False).ids
            if not bos_template:
                assert ids == reference.encode(text).ids
            assert tok.decode(ids) == reference.decode(ids) == text
    # the token cache: each document's ids, then eos, in the split's order
    splits = corpora.load_splits(data_config(corpus, tmp_path / "cache", path))
    docs = corpora.split_documents(str(corpus), "text", 0.2)
    expected = []
    for d in docs["train"]:
        expected += [*reference.encode(d.data.decode(), add_special_tokens=False).ids, tok.eos_id]
    assert [int(i) for i in splits.train] == expected and splits.train.dtype.name == "uint16"


def test_vocabulary_follows_the_file_and_pads_when_asked(tmp_path, corpus):
    path = make_tokenizer_json(tmp_path / "tok.json", [p.read_text() for p in corpus.iterdir()], vocab=333)
    n = Tokenizer.from_file(str(path)).get_vocab_size()
    cfg = config_lib.load("configs/llama.py:size=tiny", [f"--config.data.tokenizer={path}"])
    assert config_lib.model_config(cfg).vocab_size == n
    cfg.data.vocab_multiple = 128
    assert config_lib.model_config(cfg).vocab_size == -(-n // 128) * 128 > n
    # another file, another cache directory: switching tokenizers rebuilds nothing
    other = make_tokenizer_json(tmp_path / "other.json", ["something else entirely"] * 3, vocab=300)
    assert corpora.cache_dir_for(data_config(corpus, tmp_path, path)) != \
        corpora.cache_dir_for(data_config(corpus, tmp_path, other))


@pytest.mark.slow
def test_a_model_trained_with_it_generates_text_of_the_same_file(tmp_path, corpus, capsys):
    path = make_tokenizer_json(tmp_path / "tok" / "tokenizer.json", [p.read_text() for p in corpus.iterdir()])
    run = tmp_path / "runs" / "r1"  # a sweep's layout, for the ledger's record below
    common = [f"--config.data.tokenizer={path.parent}", f"--config.data.corpus={corpus}",
              f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.train.steps=30",
              "--config.train.batch_size=8", "--config.train.seq_len=32", "--config.train.eval_windows=8",
              "--config.train.log_every=10", "--config.optim.warmup_steps=1"]
    rc, _, err = run_cli(capsys, "train", "--config=configs/llama.py:size=tiny", f"--workdir={run}", *common)
    assert rc == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["tokenizer_hash"] == tokenizers.load_file(str(path)).hash
    # unique training tokens and epochs: the same in the run's config, its summary, the ledger and `scalax info`
    unique = len(corpora.load_splits(ConfigDict(config["data"])).train)  # the token stream, counted
    trained = 30 * 8 * 32
    summary = json.loads((run / "summary.json").read_text())
    assert config["data"]["unique_train_tokens"] == summary["unique_train_tokens"] == unique
    assert config["data"]["epochs"] == summary["epochs"] == trained / unique
    record = runner.run_result(str(tmp_path), "r1", 0, 1.0)
    assert (record["unique_train_tokens"], record["epochs"]) == (unique, trained / unique)
    rc, out, err = run_cli(capsys, "info", "--config=configs/llama.py:size=tiny", "--json", *common)
    info = json.loads(out)["data"]
    assert rc == 0 and (info["unique_train_tokens"], info["epochs"], info["train_tokens"]) == \
        (unique, trained / unique, trained)
    rc, out, err = run_cli(capsys, "generate", f"--checkpoint={run}", "--prompt=document 3: héllo", "--max-tokens=12",
                           "--json")
    assert rc == 0, err
    result = json.loads(out)
    reference = Tokenizer.from_file(str(path))
    assert result["tokens"] and all(0 <= t < reference.get_vocab_size() for t in result["tokens"])
    assert result["completion"] == reference.decode(result["tokens"])


def test_mistakes_are_one_line(tmp_path, corpus, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    no_eos = make_tokenizer_json(tmp_path / "noeos.json", ["abc def"] * 3, eos=None, vocab=270)
    for spec, hint in ((bad, "does not load"), (no_eos, "no end-of-text token"),
                       (tmp_path / "missing.json", "no such file")):
        with pytest.raises(ConfigError, match=hint) as e:
            corpora.load_tokenizer(data_config(corpus, tmp_path / "cache", spec))
        assert e.value.key == "data.tokenizer"
    rc, _, err = run_cli(capsys, "info", "--config=configs/llama.py:size=tiny", f"--config.data.tokenizer={bad}")
    assert rc == cli.EXIT_USER_ERROR and "data.tokenizer" in one_line(err)
    # a token id at or above the model's vocabulary: the model says it is too small
    path = make_tokenizer_json(tmp_path / "tok.json", [p.read_text() for p in corpus.iterdir()])
    rc, _, err = run_cli(capsys, "train", "--config=configs/llama.py:size=tiny", f"--workdir={tmp_path / 'run'}",
                         f"--config.data.tokenizer={path}", f"--config.data.corpus={corpus}",
                         f"--config.data.cache_dir={tmp_path / 'cache'}", "--config.model.vocab_size=260",
                         "--config.train.steps=2", "--config.train.seq_len=32", "--config.train.batch_size=8",
                         "--config.optim.warmup_steps=1")
    line = one_line(err)
    assert rc == cli.EXIT_USER_ERROR and "model.vocab_size" in line and "too small" in line, line
