"""The `scalax` command: `scalax info | train | ...`. A user's mistake prints one line and exits 2; anything
else that goes wrong prints one line and exits 1 (`--verbose` shows the traceback)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING

from scalax import __version__, io
from scalax.errors import ConfigError, ScalaxError
from scalax.train import host_memory

if TYPE_CHECKING:  # the models pull in jax: `scalax --version` and `--help` start without it
    from scalax.models.config import ModelConfig

EXIT_USER_ERROR = 2
EXIT_FAILED = 1


class Incomplete(ScalaxError):
    """The command ran but did not do its whole job (a sweep with failed runs)."""

    exit_code = EXIT_FAILED
    label = "incomplete"


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.KEY=VALUE` overrides from the other arguments."""
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def _hyphenate(arg: str) -> str:
    """`--max_tokens=5` -> `--max-tokens=5`: flags are spelled with hyphens; the underscore forms still work."""
    match = re.match(r"^(--[a-z0-9_-]+)(=.*)?$", arg, re.S)
    if not match:
        return arg
    return match.group(1).replace("_", "-") + (match.group(2) or "")


def _describe(model: ModelConfig) -> list[str]:
    """Two lines: the model's shape and its features."""
    attention = "MHA" if model.n_kv_heads == model.n_heads else ("MQA" if model.n_kv_heads == 1 else "GQA")
    return [f"model      d_model {model.d_model}, n_layers {model.n_layers}, heads {model.n_heads} x "
            f"{model.head_dim} ({attention}, kv heads {model.n_kv_heads}), d_ff {model.d_ff} ({model.mlp}), vocab "
            f"{model.vocab_size}",
            f"features   {model.norm} ({model.norm_position}-norm), position {model.position}, "
            f"{'tied' if model.tie_embeddings else 'untied'} embeddings, biases {'on' if model.use_bias else 'off'}, "
            f"context {model.max_seq_len}, compute {model.dtype}, params {model.param_dtype}"]


def cmd_info(args: argparse.Namespace, overrides: list[str]) -> int:
    """Shape, parameter counts (from the real module, under jax.eval_shape) and FLOPs per token."""
    import jax
    import jax.numpy as jnp

    from scalax import config as config_lib
    from scalax.models import Decoder, flops, presets

    if args.list:
        print("presets (configs/gpt.py:preset=NAME, configs/llama.py:preset=NAME):")
        for name, fields in presets.PRESETS.items():
            print(f"  {name:<16} d_model {fields['d_model']:>6}, n_layers {fields['n_layers']:>3}, "
                  f"position {fields['position']}, context {fields['max_seq_len']}")
        print(f"families (configs/FAMILY.py:d_model=D,n_layers=L): {', '.join(presets.FAMILIES)}")
        print("named sizes (configs/FAMILY.py:size=NAME):")
        for name, (d_model, n_layers, context) in presets.SIZES.items():
            print(f"  {name:<16} d_model {d_model:>6}, n_layers {n_layers:>3}, context {context}")
        return 0
    if not args.config:
        raise ConfigError("scalax info", "give --config=FILE[:ARG] (or --list for the presets)")
    cfg = config_lib.load_run(args.config, overrides)
    model_cfg = config_lib.model_config(cfg)
    seq_len = cfg.train.seq_len
    config_lib.check_seq_len(seq_len, model_cfg)
    tokens = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda: Decoder(model_cfg).init(jax.random.key(0), tokens))["params"]
    counts = flops.count_params(shapes)
    per_token = flops.all_flops_per_token(model_cfg, seq_len)
    data = _data_summary(cfg)
    if args.json:
        print(json.dumps({"model": model_cfg.to_dict(), "seq_len": seq_len, **counts,
                          "flops_per_token": per_token, "data": data}, indent=2))
        return 0
    print("\n".join(_describe(model_cfg)))
    for key, value in counts.items():
        print(f"{key:<22} {value:>20,d}  ({value / 1e9:.3f} B)")
    print(f"FLOPs per token at seq_len {seq_len} (training: forward + backward)")
    for convention, value in per_token.items():
        print(f"  {convention:<20} {value:>20,.0f}  ({value / 1e9:.3f} GFLOP)")
    if data["unique_train_tokens"] is None:
        print(f"data       {cfg.data.corpus}: not tokenized yet (scalax prepare, or the first train, builds the "
              f"cache); this run trains on {data['train_tokens']:,} tokens")
    else:
        print(f"data       {cfg.data.corpus}: {data['unique_train_tokens']:,} unique training tokens; this run "
              f"trains on {data['train_tokens']:,} tokens, {data['epochs']:.2f} epochs")
    return 0


def _data_summary(cfg) -> dict:
    """The training split's unique tokens (from a current token cache; None when there is none yet) and the
    epochs a run makes over it."""
    from scalax.data import corpora
    from scalax.train.setup import total_steps

    train_tokens = total_steps(cfg.train) * cfg.train.batch_size * cfg.train.seq_len
    header = corpora.current_header(cfg.data)
    return {"train_tokens": train_tokens,
            "unique_train_tokens": header["counts"]["train"]["tokens"] if header else None,
            "epochs": corpora.epochs(header, train_tokens) if header else None}


def cmd_train(args: argparse.Namespace, overrides: list[str]) -> int:
    """Train (or resume) one run; prints eval lines, writes the workdir (see README)."""
    from scalax import config as config_lib
    from scalax.parallel import mesh
    from scalax.train import loop

    if args.distributed or args.coordinator or args.num_processes is not None or args.process_id is not None \
            or os.environ.get(mesh.ENV["coordinator"]):
        mesh.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    cfg = config_lib.load_run(args.config, overrides)
    summary = loop.train(cfg, args.workdir, allow_changes=args.allow_changes)
    print(f"finished: step {summary['step']}, eval {summary['eval_loss']:.4f} nats/token, "
          f"{summary['eval_bpb']:.4f} bits/byte; {args.workdir}")
    return 0


def cmd_prepare(args: argparse.Namespace, overrides: list[str]) -> int:
    """Build the token cache (and train the BPE tokenizer, when data.tokenizer=bpe) ahead of training."""
    from scalax import config as config_lib
    from scalax.data import corpora

    if args.workers < 0:
        raise ConfigError("--workers", f"must be a positive integer (or 0: one per core), got {args.workers}")
    cfg = config_lib.load_run(args.config, overrides)
    splits = corpora.load_splits(cfg.data, workers=args.workers or None)
    counts = splits.header["counts"]
    print(f"{cfg.data.corpus}: {counts['train']['tokens']:,} train and {counts['val']['tokens']:,} validation "
          f"tokens ({splits.tokenizer.name}, vocabulary {splits.tokenizer.vocab_size}, "
          f"{splits.bytes_per_token():.3f} bytes/token) in "
          f"{cfg.data.corpus if corpora.pretokenized(cfg.data.corpus) else corpora.cache_dir_for(cfg.data)}")
    return 0


def cmd_sweep(args: argparse.Namespace, overrides: list[str]) -> int:
    """Run (or resume) a sweep, then fit and plot; exit status 1 when a run did not finish."""
    if args.parallel is not None and args.parallel <= 0:
        raise ConfigError("--parallel", f"must be a positive integer, got {args.parallel}")
    from scalax.scaling.forkserver import ForkServer

    server = ForkServer().start()  # it imports the training code on another core while this process plans
    try:
        from scalax import config as config_lib
        from scalax.scaling import runner

        cfg = config_lib.load(args.config, overrides)
        runner.check_sweep_config(cfg)
        io.check_output_dir(args.workdir, "--workdir")
        runner.run_sweep(cfg, args.workdir, args.parallel, force=args.force, server=server)
    finally:
        server.close()
    unfinished = runner.Ledger(args.workdir).unfinished()
    if unfinished:
        for r in unfinished:
            print(f"scalax sweep: {r['name']} {r.get('status')}: {r.get('error')}", file=sys.stderr)
        raise Incomplete(f"{len(unfinished)} of {len(runner.Ledger(args.workdir).records)} runs did not finish "
                         f"({', '.join(r['name'] for r in unfinished)}); run the same command again to retry them")
    unevaluated = [r["name"] for r in runner.Ledger(args.workdir).records.values() if r.get("eval_lengths_error")]
    if unevaluated:  # sweep.eval_lengths: their `scalax eval` failed (the error is in the ledger)
        raise Incomplete(f"{len(unevaluated)} run(s) not evaluated at sweep.eval_lengths ({', '.join(unevaluated)});"
                         " run the same command again to retry them")
    return 0


def _sweep_of(directory: str) -> dict:
    """The `sweep` section of a sweep directory's sweep.json ({} when it has none)."""
    from scalax import config as config_lib

    path = io.join(directory, "sweep.json")
    if not io.isfile(path):
        return {}
    cfg = config_lib.load(path)
    return cfg.sweep.to_dict() if "sweep" in cfg else {}


def cmd_fit(args: argparse.Namespace, overrides: list[str]) -> int:
    """Fit a sweep directory or a CSV (params, tokens, loss[, flops]), as the sweep itself does."""
    from scalax.models import flops
    from scalax.scaling import analysis, report, results, runner
    from scalax.scaling import fit as fit_lib

    if args.flops is not None and args.flops not in flops.CONVENTIONS:
        raise ConfigError("--flops", f"unknown FLOPs convention {args.flops!r}; allowed: "
                          f"{', '.join(flops.CONVENTIONS)}")
    if bool(args.csv) == bool(args.dir):
        raise ConfigError("scalax fit", "give a sweep directory or --csv FILE (one of them)")
    if args.csv:
        runs, sweep, conventions = fit_lib.read_csv(args.csv), {}, None
    else:
        io.check_input(args.dir, "scalax fit")
        if not io.isdir(args.dir):
            raise ConfigError("scalax fit", f"no such directory: {args.dir}")
        ledger = runner.Ledger(args.dir)
        if not ledger.records:
            raise ConfigError("scalax fit", f"{args.dir} holds no runs.jsonl")
        sweep = _sweep_of(args.dir)  # the sweep's own conventions and bootstrap, unless flags say otherwise
        sweep.update({k: v for k, v in (("params", args.params), ("flops", args.flops)) if v is not None})
        conventions = analysis.conventions(sweep)
        runs = analysis.runs_of_ledger(list(ledger.records.values()), sweep)
    bootstrap = args.bootstrap if args.bootstrap is not None else sweep.get("bootstrap", 0)
    seed = args.seed if args.seed is not None else sweep.get("seed", 0)
    result = analysis.analyse(runs, args.approach, bootstrap=bootstrap, level=args.level, seed=seed,
                              conventions_used=conventions, drop_highest=args.drop_highest)
    print(json.dumps(results.jsonable(result), indent=2) if args.json else report.summary(result))
    return 0


def cmd_plot(args: argparse.Namespace, overrides: list[str]) -> int:
    """Fit and plot a sweep directory again (fit.json, fit_runs.csv, report.md, plots/)."""
    from scalax import config as config_lib
    from scalax.scaling import runner

    io.check_input(args.dir, "scalax plot")
    path = io.join(args.dir, "sweep.json")
    if not io.isfile(path):
        raise ConfigError("scalax plot", f"{args.dir} is not a sweep directory (no sweep.json)")
    cfg = config_lib.load(path, overrides)
    runner.check_sweep_config(cfg, path)
    runner.fit_and_plot(args.dir, cfg)
    return 0


def cmd_plan(args: argparse.Namespace, overrides: list[str]) -> int:
    """Per-device memory of a config's train step on N devices, and whether it fits a device. Runs in a child
    process with N fake CPU devices (XLA reads the device count once, before jax starts)."""
    import subprocess

    from scalax.parallel import devices

    if args.devices <= 0:
        raise ConfigError("--devices", f"must be a positive integer, got {args.devices}")
    memory, description = devices.device_memory(args.device, args.device_memory)
    if os.environ.get("SCALAX_PLAN_CHILD") != str(args.devices):
        env = {**os.environ, "SCALAX_PLAN_CHILD": str(args.devices), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} "
                            f"--xla_force_host_platform_device_count={args.devices}".strip()}
        return subprocess.run([sys.executable, "-m", "scalax", *args.argv], env=env).returncode
    from scalax import config as config_lib
    from scalax.train import memory as memory_lib

    platform = devices.PLATFORM.get((args.device or "").lower())  # the run's, where --device names it
    report = memory_lib.memory_plan(config_lib.load_run(args.config, overrides), args.devices, platform)
    report["device"] = description
    report["fits"] = memory_lib.verdict(report, memory)
    print(json.dumps(report, indent=2) if args.json else memory_lib.format_report(report, memory, description))
    return 0 if report["fits"] != "does not fit" else 1


def cmd_bench(args: argparse.Namespace, overrides: list[str]) -> int:
    """Throughput, MFU, compile time and memory of each config's real train step (scalax/train/bench.py)."""
    from scalax import config as config_lib
    from scalax.train import bench as bench_lib

    for key, value in (("--steps", args.steps), ("--rounds", args.rounds)):
        if value <= 0:
            raise ConfigError(key, f"must be a positive integer, got {value}")
    configs = {spec: config_lib.load_run(spec, overrides) for spec in args.config}
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    results = bench_lib.bench(configs, args.steps, args.rounds, log)
    print(json.dumps(results, indent=2) if args.json else bench_lib.format_table(results))
    return 0


def cmd_coordcheck(args: argparse.Namespace, overrides: list[str]) -> int:
    """muP's coordinate check (scalax/train/coordcheck.py): mean |x| per activation across widths."""
    from scalax import config as config_lib
    from scalax.train import coordcheck

    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        raise ConfigError("--widths", f"a comma-separated list of integers, e.g. 128,256,512, got "
                          f"{args.widths!r}") from None
    if args.out:
        io.check_output_dir(args.out, "--out")
        if io.exists(io.join(args.out, "coordcheck.json")) and not args.force:
            raise ConfigError("--out", f"{args.out} already holds coordcheck.json; pass --force to replace it")
    cfg = config_lib.load_run(args.config, overrides)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print
    result = coordcheck.coordcheck(cfg, widths, args.seeds, args.steps, log)
    if args.out:
        io.make_output_dir(args.out, "--out")
        io.atomic_write_bytes(io.join(args.out, "coordcheck.png"), coordcheck.plot(result))
        io.atomic_write_text(io.join(args.out, "coordcheck.json"), json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['parameterization']}: slope of log mean|x| on log width, widths {widths}")
        for name, a in result["activations"].items():
            print(f"  {name:32s} {a['slope']:+.3f}  " + " ".join(f"{v:.3g}" for v in a["mean_abs"]))
    return 0


def cmd_launch(args: argparse.Namespace, overrides: list[str]) -> int:
    """Launch a sweep onto Cloud TPU (scalax/launch/launcher.py), or show where one stands."""
    from scalax.launch import status as status_lib

    if args.action == "status":
        report = status_lib.status(args.workdir)
        print(json.dumps(report, indent=2) if args.json else status_lib.format_status(report))
        return 0
    from scalax import config as config_lib
    from scalax.launch import launcher, tpus
    from scalax.launch.commands import Options

    if not args.config:
        raise ConfigError("--config", "scalax launch needs a sweep config, e.g. configs/sweeps/quickstart.py")
    for key, value in (("--mfu", args.mfu), ("--price", args.price)):
        if value is not None and not (value > 0 and (key != "--mfu" or value <= 1)):
            raise ConfigError(key, f"must be {'in (0, 1]' if key == '--mfu' else 'positive'}, got {value}")
    options = Options(backend=args.backend, tpu=tpus.parse(args.tpu), project=args.project, zone=args.zone,
                      spot=args.spot, retries=args.retries, max_slices=args.max_slices,
                      runtime_version=args.runtime_version, setup=args.setup, cluster=args.cluster,
                      image=args.image, base_image=args.base_image, poll_seconds=args.poll_seconds)
    cfg = config_lib.load(args.config, overrides)
    unfinished = launcher.launch(cfg, args.workdir, options, dry_run=args.dry_run, force=args.force,
                                 mfu=args.mfu, price=args.price)
    if unfinished:
        for r in unfinished:
            print(f"scalax launch: {r['name']} {r.get('status')}: {r.get('error')}", file=sys.stderr)
        raise Incomplete(f"{len(unfinished)} runs did not finish ({', '.join(r['name'] for r in unfinished)}); "
                         "run the same command again to retry them")
    return 0


def _check_target(path: str, key: str, force: bool) -> None:
    """Refuse to write a checkpoint or an export into a file, a training workdir, or a non-empty directory,
    unless --force."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(key, f"{path} is a file; allowed: a new or empty directory")
    if os.path.isdir(path) and os.listdir(path) and not force:
        what = ("a training workdir" if os.path.exists(os.path.join(path, "checkpoints")) else
                "a checkpoint" if os.path.exists(os.path.join(path, "params")) else "not empty")
        raise ConfigError(key, f"{path} is {what}; writing there would replace its files. Allowed: a new or empty "
                          "directory, or --force to overwrite")
    io.check_output_dir(path, key)


def cmd_convert(args: argparse.Namespace, overrides: list[str]) -> int:
    """Hugging Face directory <-> scalax checkpoint."""
    import shutil

    import ml_collections

    from scalax import config as config_lib
    from scalax.interop import hf
    from scalax.models import presets
    from scalax.train import checkpoint

    if bool(args.from_hf) == bool(args.to_hf) or bool(args.from_hf) != bool(args.to) or bool(args.to_hf) != bool(
            args.source):
        raise ConfigError("scalax convert", "give --from-hf HF_DIR --to CKPT_DIR, or --from CKPT_DIR --to-hf HF_DIR")
    if args.from_hf:
        _check_target(args.to, "--to", args.force)
        model_cfg, params = hf.load(args.from_hf)
        cfg = config_lib.load(f"configs/{presets.family_of(model_cfg)}.py")  # the family's experiment defaults
        cfg.model = model_cfg.to_dict()
        cfg.train.seq_len = min(model_cfg.max_seq_len, 2048)
        checkpoint.save_params(args.to, cfg.to_dict(), params, overwrite=args.force)
        if os.path.isfile(os.path.join(args.from_hf, "tokenizer.json")):  # generate uses it
            shutil.copy(os.path.join(args.from_hf, "tokenizer.json"), os.path.join(args.to, "tokenizer.json"))
        print(f"{args.from_hf} -> {args.to} ({model_cfg.n_layers} layers, d_model {model_cfg.d_model})")
        return 0
    _check_target(args.to_hf, "--to-hf", args.force)
    config, params, where = checkpoint.load_params(args.source, warn=_warn)
    model_cfg = config_lib.model_config(ml_collections.ConfigDict(config))
    hf.save(model_cfg, params, args.to_hf)
    print(f"{where} -> {args.to_hf} ({hf.config_to_hf(model_cfg)['architectures'][0]})")
    return 0


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_generate(args: argparse.Namespace, overrides: list[str]) -> int:
    """Continue prompts with a trained or converted model (KV cache, compiled decode loop)."""
    import ml_collections

    from scalax import config as config_lib
    from scalax.data import corpora, tokenizers
    from scalax.models.generate import generate
    from scalax.train import checkpoint

    if not args.prompt:
        raise ConfigError("--prompt", "give at least one --prompt")
    config, params, _ = checkpoint.load_params(args.checkpoint, warn=_warn)
    cfg = ml_collections.ConfigDict(config)
    for item in overrides:  # e.g. --config.model.dtype=float32
        config_lib.apply_override(cfg, item)
    model_cfg = config_lib.model_config(cfg)
    tokenizer_json = os.path.join(args.checkpoint, "tokenizer.json")
    tok = (tokenizers.BpeTokenizer.load(tokenizer_json) if os.path.isfile(tokenizer_json)
           else corpora.load_tokenizer(cfg.data, log=lambda m: print(m, file=sys.stderr)))
    eos = args.eos_id if args.eos_id is not None else getattr(tok, "eos_id", None)
    prompts = [[int(i) for i in tok.encode(p.encode())] for p in args.prompt]
    outputs = generate(model_cfg, params, prompts, args.max_tokens, args.temperature, args.top_k, args.top_p,
                       args.seed, eos)
    for prompt, new in zip(args.prompt, outputs, strict=True):
        print(json.dumps({"prompt": prompt, "completion": tok.decode(new), "tokens": new}) if args.json
              else prompt + tok.decode(new))
    return 0


def _lengths(text: str | None, train_length: int) -> list[int]:
    """--lengths 128,256,... (default: 1, 2, 4 and 8 times the training length)."""
    if not text:
        return [train_length * k for k in (1, 2, 4, 8)]
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError("--lengths", f"got {text!r}; allowed: positive integers separated by commas, e.g. "
                          "128,256,512") from None


def cmd_eval(args: argparse.Namespace, overrides: list[str]) -> int:
    """The validation loss of a trained model at several lengths (windows and sliding windows), per position."""
    import ml_collections

    from scalax import config as config_lib
    from scalax.data import corpora
    from scalax.evaluate import lengths as lengths_lib
    from scalax.evaluate import plots  # matplotlib: only for this command
    from scalax.scaling.results import jsonable
    from scalax.train import checkpoint

    config, params, source = checkpoint.load_params(args.checkpoint, warn=_warn)
    cfg = ml_collections.ConfigDict(config)
    for item in overrides:  # e.g. --config.model.rope_scaling=yarn --config.model.rope_scaling_factor=4
        config_lib.apply_override(cfg, item)
    model_cfg, train_length = config_lib.model_config(cfg), cfg.train.seq_len
    lengths = _lengths(args.lengths, train_length)
    lengths_lib.check_lengths(lengths, model_cfg)
    if not 0 < args.stride <= 1:
        raise ConfigError("--stride", f"got {args.stride}; allowed: a fraction of the length in (0, 1]")
    out = args.out or io.join(args.checkpoint, "eval")
    io.make_output_dir(out, "--out")  # (before the work: an unwritable --out is told at once)
    log = functools.partial(print, file=sys.stderr)
    data = corpora.load_splits(cfg.data, log=log)
    results = lengths_lib.evaluate_lengths(model_cfg, params, data.val, data.header["max_token_id"], lengths,
                                           args.windows or cfg.train.eval_windows, cfg.train.batch_size * train_length,
                                           args.stride, log=log, layout=lengths_lib.run_layout(cfg, model_cfg, log))
    title = f"{model_cfg.position}" + (f", rope_scaling {model_cfg.rope_scaling}" if model_cfg.rope_scaling != "none"
                                       else "") + f", trained at {train_length}"
    record = {"checkpoint": source, "position": model_cfg.position, "rope_scaling": model_cfg.rope_scaling,
              "train_seq_len": train_length, "bytes_per_token": data.bytes_per_token("val"),
              "lengths": jsonable(results)}
    io.atomic_write_json(io.join(out, "lengths.json"), record)
    paths = plots.plot_lengths(results, train_length, title, out)
    print("length  windows  loss (nats/token)  ± se     strided loss  x training length")
    for r in results:
        print(f"{r.length:6d}  {r.windows:7d}  {r.loss:17.4f}  {r.loss_se:.4f}  {r.strided.loss:12.4f}  "
              f"{r.length / train_length:g}")
    print(f"wrote {io.join(out, 'lengths.json')} and {', '.join(os.path.basename(p) for p in paths)}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported in one line (the usage itself is one --help away)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="on an error, print the whole traceback too")
    kw = {"parents": [common], "formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    overrides = "Override any config field with --config.KEY=VALUE."
    parser = Parser(prog="scalax", description="Language-model scaling experiments in JAX. "
                                     "Flags are spelled with hyphens (--max-tokens); underscores work too.")
    parser.add_argument("--version", action="version", version=f"scalax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="a model's shape, parameter counts and FLOPs per token", description=overrides,
                          **kw)
    info.add_argument("--config", help="config file and argument, e.g. configs/llama.py:size=tiny")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--list", action="store_true", help="list the presets, families and named sizes")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train or resume one run", description=overrides, **kw)
    train.add_argument("--config", required=True, help="config file and argument, e.g. configs/llama.py:size=tiny")
    train.add_argument("--workdir", required=True, help="run directory: checkpoints, logs; resumes if it has one")
    train.add_argument("--allow-changes", action="store_true",
                       help="resume even though the run's length (train.steps, train.tokens) or optimizer (optim.*) "
                            "differ from the checkpoint's; the new schedule applies from the restored step")
    multi = train.add_argument_group("multi-host (jax.distributed); or SCALAX_COORDINATOR, SCALAX_NUM_PROCESSES, "
                                     "SCALAX_PROCESS_ID")
    multi.add_argument("--distributed", action="store_true",
                       help="initialise jax.distributed; alone, JAX detects the cluster (Cloud TPU, SLURM)")
    multi.add_argument("--coordinator", help="HOST:PORT of process 0")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    train.set_defaults(func=cmd_train)

    prepare = sub.add_parser("prepare", help="tokenize the corpus (and train a BPE) ahead of training",
                             description=overrides, **kw)
    prepare.add_argument("--config", required=True, help="config file and argument, e.g. configs/llama.py:size=tiny")
    prepare.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: one per core; "
                         "one for the byte tokenizer, which is faster in-process)")
    prepare.set_defaults(func=cmd_prepare)

    sweep = sub.add_parser("sweep", help="run a sweep (resumable), then fit and plot", description=overrides + " "
                           "Exit status 1 when a run failed (the others still train, and the fit uses them).", **kw)
    sweep.add_argument("--config", required=True, help="a sweep config, e.g. configs/sweeps/quickstart.py")
    sweep.add_argument("--workdir", required=True, help="the sweep's directory; resumes if it holds the same sweep")
    sweep.add_argument("--parallel", type=int, default=None,
                       help="runs trained at once, each pinned to its share of the CPUs (default: sweep.parallel, "
                            "else 1)")
    sweep.add_argument("--force", action="store_true",
                       help="the workdir holds a sweep with another grid: move the runs that changed to "
                            "DIR/replaced/ and train the new grid")
    sweep.set_defaults(func=cmd_sweep)

    from scalax.scaling.results import APPROACH_CHOICES  # (numpy only: the parser imports no JAX)

    fit = sub.add_parser("fit", help="fit scaling laws to a sweep directory or a CSV",
                         description="Prints every approach with its intervals and warnings (or --json). A sweep "
                                     "directory is fitted as the sweep fitted it: its conventions, bootstrap and "
                                     "seed, unless given here.", **kw)
    fit.add_argument("dir", nargs="?", help="a sweep directory (its runs.jsonl and sweep.json)")
    fit.add_argument("--csv", help="a CSV with columns params, tokens, loss (optional: flops, name), e.g. a sweep's "
                                   "fit_runs.csv")
    fit.add_argument("--approach", default="all", help=f"one of {', '.join(APPROACH_CHOICES)} (all: 1, 2, 3 "
                     "and Kaplan's; data_constrained: Muennighoff et al.'s law for runs that repeat data, from "
                     "each run's unique tokens)")
    fit.add_argument("--bootstrap", type=int, help="resamples over runs for the intervals (default: the sweep's, "
                                                   "or 0 for a CSV)")
    fit.add_argument("--level", type=float, default=0.8, help="confidence level of the intervals, in (0, 1)")
    fit.add_argument("--drop-highest", type=int, default=0, help="drop the k highest losses")
    fit.add_argument("--params", choices=("non_embedding", "total"), help="N of a sweep (default: the sweep's)")
    fit.add_argument("--flops", help="C of a sweep: 6n, 6n_head, 6n_head_attn or exact (default: the sweep's)")
    fit.add_argument("--seed", type=int, help="bootstrap seed (default: the sweep's, or 0)")
    fit.add_argument("--json", action="store_true", help="print fit.json's object")
    fit.set_defaults(func=cmd_fit)

    plan = sub.add_parser("plan", help="per-device memory of a train step on N devices; does it fit a device?",
                          description=overrides + " Exit status 1 when it does not fit.", **kw)
    plan.add_argument("--config", required=True, help="config file and argument, e.g. configs/llama.py:size=tiny")
    plan.add_argument("--devices", type=int, required=True, help="devices of the slice (all processes)")
    plan.add_argument("--device", help="a device to check against: v4, v5e, v5p, v6e, h100, h200")
    plan.add_argument("--device-memory", help="memory per device instead, e.g. 16GiB")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="tokens/s, MFU, compile time and memory of configs' train steps",
                           description=overrides + " The overrides apply to every --config.", **kw)
    bench.add_argument("--config", required=True, action="append",
                       help="config file and argument, e.g. configs/llama.py:size=tiny (repeat for several)")
    bench.add_argument("--steps", type=int, default=10, help="steps per timed round")
    bench.add_argument("--rounds", type=int, default=3, help="rounds, alternating between the configs")
    bench.add_argument("--json", action="store_true", help="print a JSON list, one object per config")
    bench.set_defaults(func=cmd_bench)

    check = sub.add_parser("coordcheck", help="muP's coordinate check: activation sizes across widths",
                           description=overrides + " Each width is the config's model at d_model = w (head_dim kept, "
                           "heads and d_ff scaled), trained a few AdamW steps at a constant learning rate.",
                           **kw)
    check.add_argument("--config", required=True, help="config file and argument, e.g. configs/gpt.py:size=tiny "
                                                       "with --config.model.parameterization=mup")
    check.add_argument("--widths", default="128,256,512,1024", help="comma-separated d_model values")
    check.add_argument("--seeds", type=int, default=3, help="seeds averaged per width")
    check.add_argument("--steps", type=int, default=4, help="AdamW steps before the activations are measured")
    check.add_argument("--out", help="a directory for coordcheck.json and coordcheck.png")
    check.add_argument("--force", action="store_true", help="replace the coordcheck.json and .png --out holds")
    check.add_argument("--json", action="store_true", help="print the JSON object")
    check.set_defaults(func=cmd_coordcheck)

    convert = sub.add_parser("convert", help="Hugging Face directory <-> scalax checkpoint", **kw)
    convert.add_argument("--from-hf", help="a Hugging Face model directory (GPT2LMHeadModel, LlamaForCausalLM)")
    convert.add_argument("--to", help="the scalax checkpoint directory to write (config.json, params/)")
    convert.add_argument("--from", dest="source", help="a training workdir or a converted checkpoint")
    convert.add_argument("--to-hf", help="the Hugging Face directory to write (config.json, model.safetensors)")
    convert.add_argument("--force", action="store_true", help="write into a non-empty directory, replacing its files")
    convert.set_defaults(func=cmd_convert)

    gen = sub.add_parser("generate", help="continue prompts with a trained or converted model",
                         description=overrides, **kw)
    gen.add_argument("--checkpoint", required=True, help="a training workdir or a converted checkpoint")
    gen.add_argument("--prompt", action="append", help="a prompt; repeat for a batch")
    gen.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    gen.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus filter")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--eos-id", type=int, help="stop token (default: the tokenizer's end of text)")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="the validation loss at other lengths than the training one",
                        description=overrides + " E.g. --config.model.rope_scaling=yarn to extend RoPE.", **kw)
    ev.add_argument("--checkpoint", required=True, help="a training workdir or a converted checkpoint")
    ev.add_argument("--lengths", help="evaluation lengths, e.g. 128,256,512 (default: 1, 2, 4, 8 x train.seq_len)")
    ev.add_argument("--windows", type=int, default=0, help="windows per length (0: the run's train.eval_windows)")
    ev.add_argument("--stride", type=float, default=0.5, help="sliding windows every this fraction of the length")
    ev.add_argument("--out", help="output directory (default: CHECKPOINT/eval)")
    ev.set_defaults(func=cmd_eval)

    plot = sub.add_parser("plot", help="fit and plot a sweep directory again", **kw)
    plot.add_argument("dir", help="a sweep directory (its sweep.json and runs.jsonl)")
    plot.set_defaults(func=cmd_plot)

    launch = sub.add_parser("launch", help="a sweep onto Cloud TPU (tpu-vm or xpk), with retries, status and cost",
                            description=overrides + " `scalax launch status --workdir=gs://...` shows a launched "
                            "sweep. Exit status 1 when a run did not finish. See docs/cloud-tpu.md.", **kw)
    launch.add_argument("action", nargs="?", choices=("status",), help="status: where the sweep in --workdir stands")
    launch.add_argument("--config", help="a sweep config, e.g. configs/sweeps/quickstart.py")
    launch.add_argument("--workdir", required=True, help="the sweep's directory on a bucket: gs://BUCKET/PATH")
    launch.add_argument("--backend", default="tpu-vm", help="tpu-vm (queued resources, ssh) or xpk (GKE)")
    launch.add_argument("--tpu", default="v5litepod-8", help="the largest slice a run may get (v4-8, v5litepod-16, "
                        "v5p-8, v6e-4, ...); each run gets the smallest of that generation that fits it")
    launch.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT", ""), help="Google Cloud "
                        "project (default: $CLOUDSDK_CORE_PROJECT)")
    launch.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE", ""), help="zone (default: "
                        "$CLOUDSDK_COMPUTE_ZONE)")
    launch.add_argument("--spot", action="store_true", help="spot capacity: cheaper, preempted at any time")
    launch.add_argument("--retries", type=int, default=3, help="times a run is brought back after a preemption")
    launch.add_argument("--max-slices", type=int, default=1, help="slices (tpu-vm) or workloads (xpk) at once")
    launch.add_argument("--dry-run", action="store_true", help="print the cost and the exact commands; create nothing")
    launch.add_argument("--force", action="store_true", help="as for sweep: the workdir holds another grid")
    launch.add_argument("--mfu", type=float, help="MFU for the cost estimate (default: by model size, stated)")
    launch.add_argument("--price", type=float, help="USD per chip-hour (default: the table in scalax/launch/tpus.py)")
    launch.add_argument("--poll-seconds", type=float, default=30.0, help="seconds between state queries")
    launch.add_argument("--json", action="store_true", help="status: print one JSON object")
    vm = launch.add_argument_group("tpu-vm")
    vm.add_argument("--runtime-version", default="", help="TPU VM image (default: the generation's)")
    vm.add_argument("--setup", default="", help="command run once on every worker of a new slice (default: "
                    "install jax[tpu] and a wheel of this checkout, copied over)")
    xpk = launch.add_argument_group("xpk")
    xpk.add_argument("--cluster", default="", help="the GKE cluster (xpk cluster create)")
    xpk.add_argument("--image", default="", help="a Docker image with scalax installed (xpk --docker-image)")
    xpk.add_argument("--base-image", default="python:3.11", help="else: a base image to which xpk adds this "
                     "checkout, installed when the workload starts (xpk --base-docker-image)")
    launch.set_defaults(func=cmd_launch)
    return parser


COMPILES = ("train", "plan", "generate", "eval")  # the commands that compile a model's program
RUNS_STEPS = ("train", "bench", "generate", "eval", "coordcheck")  # the commands that run compiled steps many times


def use_compilation_cache() -> None:
    """JAX's persistent compilation cache in CACHE/jax (io.cache_root): a process that compiles a program an
    earlier one on this machine compiled (a resumed run, a sweep's restarted run) loads it instead (a 20-step
    tiny run: 14.2 s -> 8.9 s on 2 CPU cores). JAX_COMPILATION_CACHE_DIR moves it elsewhere;
    JAX_ENABLE_COMPILATION_CACHE=false turns it off. Programs that took 0.3 s or more to compile are kept (JAX's
    default, 1 s, left out the quickstart's initialisers and evaluations, 0.5-1.1 s each, which runs of one model
    at several budgets share); JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS sets another bound."""
    import jax

    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir", os.path.join(io.cache_root(), "jax"))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


FIT_HINT = ("lower train.batch_size, raise train.microbatches, set model.remat (dots_no_batch, full), use "
            "model.attention=dot_product or chunked, or shard over more devices (mesh.fsdp); `scalax plan` tells "
            "what fits")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args_only, overrides = _split_overrides(argv)
    try:
        args = build_parser().parse_args([_hyphenate(a) for a in args_only])
    except SystemExit as e:  # --help, --version, or a usage mistake (already printed in one line)
        return e.code if isinstance(e.code, int) else EXIT_USER_ERROR
    args.argv = argv
    try:
        if args.command in COMPILES:
            use_compilation_cache()
        if args.command in RUNS_STEPS:
            host_memory.keep_freed_memory()
        return args.func(args, overrides)
    except ScalaxError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"scalax {args.command}: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"scalax {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path the user named: missing, unreadable, not writable, a file for a directory
        if args.verbose:
            traceback.print_exc()
        where = f" {e.filename}" if e.filename else ""
        print(f"scalax {args.command}: error:{where}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:  # a bug, or a case we did not foresee: one line, the traceback on request
        if args.verbose:
            traceback.print_exc()
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        if first.startswith("RESOURCE_EXHAUSTED"):  # XLA's: the config asks more of a device than it holds
            print(f"scalax {args.command}: out of device memory: {first.split(' [')[0]}; {FIT_HINT}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"scalax {args.command}: internal error: {type(e).__name__}: {first} (run with --verbose for the "
              "traceback, and please report it)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
