"""`rexmoe-convert`: checkpoints to and from Hugging Face, upcycling, inspection.

  rexmoe-convert export-hf CKPT OUT [--compact] [--tokenizer tokenizer.json|byte]
  rexmoe-convert import-hf HF_DIR OUT                     (an export of ours, unrolled or compact,
                                                           or a stock Qwen2-MoE / Qwen3-MoE folder)
  rexmoe-convert upcycle CKPT OUT --reuse-group-size R    (a vanilla r=1 checkpoint -> ReXMoE)
  rexmoe-convert inspect CKPT [--ep N]

CKPT is a training checkpoint directory (with latest_checkpointed_iteration.txt) or one iter_*
directory, saved in any parallel layout. A bad input exits with status 2 and one line saying why.

OUT is checked before any work: never an input, inside an input or a checkpoint, or around one, and
never an existing non-empty directory this verb did not write. Every OUT carries .rexmoe-output.json
(the verb and the files it wrote); --overwrite replaces only such an earlier output of the same verb
holding nothing else (docs/convert.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _export(args) -> str:
    """Streamed: the checkpoint is read one decoder layer (and reuse group's expert bank) at a time
    straight from its files, so memory stays at about one layer, whatever the model's depth."""
    from rexmoe_train.convert import checkpoint_io
    from rexmoe_train.convert.export import export_compact, export_hf, export_tokenizer

    cfg, streamed, meta = checkpoint_io.open_streamed(Path(args.checkpoint), bf16=args.dtype == "bf16")
    vocab = int(meta["model"]["model.vocab_size"])
    source = str(Path(args.checkpoint).resolve())
    progress = not args.quiet
    if args.compact:
        out = export_compact(cfg, streamed, vocab, Path(args.out), source=source, overwrite=args.overwrite,
                             progress=progress)
        return f"exported {checkpoint_io.describe_meta(meta)} to {out}"
    # the byte tokenizer needs no file, so a byte-trained model always ships its tokenizer
    spec = args.tokenizer or ("byte" if cfg.data.tokenizer == "byte" else None)
    if spec is not None and spec != "byte" and not Path(spec).exists():
        raise _error(f"--tokenizer {spec}: no such file (byte or the tokenizer.json / tokenizer folder the "
                     "data was preprocessed with)")
    tokenizer = export_tokenizer(spec, cfg, vocab, args.eod_token) if spec is not None else None
    out = export_hf(cfg, streamed, streamed.padded_vocab, Path(args.out), tokenizer=tokenizer,
                    source=source, tokenizer_vocab_size=vocab, overwrite=args.overwrite, progress=progress)
    message = f"exported {checkpoint_io.describe_meta(meta)} to {out}"
    if tokenizer is None:
        message += (f"; no tokenizer shipped: pass --tokenizer with the tokenizer.json the data was "
                    f"preprocessed with (data.tokenizer={cfg.data.tokenizer})")
    else:
        message += f"; tokenizer {spec} (eos_token_id {tokenizer.eos_token_id})"
        message += f"; {tokenizer.note}" if tokenizer.note else ""
    return message


def _import(args) -> str:
    from rexmoe_train.config.schema import ConfigError, experiment_from_dict
    from rexmoe_train.convert import checkpoint_io, hf_import
    from rexmoe_train.convert.export import EXPORT_META, load_hf_tensors
    from rexmoe_train.convert.transforms import from_hf_unrolled

    folder = Path(args.hf_dir)
    if args.step < 1:
        raise _error(f"--step {args.step}: must be >= 1 (a checkpoint records the steps completed)")
    if not (folder / EXPORT_META).exists() and hf_import.is_stock_folder(folder):
        return _import_stock(args, folder)
    try:
        export_meta = json.loads((folder / EXPORT_META).read_text())
        cfg = checkpoint_io.single_process(experiment_from_dict(export_meta["experiment"]))
    except FileNotFoundError:
        raise _error(f"{folder}: neither {EXPORT_META} nor config.json: only exports made by `rexmoe-convert "
                     "export-hf` and stock Qwen2-MoE / Qwen3-MoE folders can be imported") from None
    except (ValueError, KeyError, ConfigError) as err:
        raise _error(f"{folder / EXPORT_META}: unreadable ({err})") from None
    tensors = load_hf_tensors(folder)
    vocab = int(export_meta["vocab_size"])  # the tokenizer's; the embedding is padded from it
    state = tensors if export_meta["format"] == "rexmoe-compact" else from_hf_unrolled(cfg, tensors)
    out = _load_and_save(args, folder, cfg, vocab, lambda padded: state)
    return f"imported {folder} ({export_meta['format']}) as a model-only checkpoint at {out}"


def _import_stock(args, folder: Path) -> str:
    """A stock transformers Qwen2-MoE / Qwen3-MoE folder -> a vanilla (r=1) model-only checkpoint."""
    from rexmoe_train.convert import checkpoint_io, hf_import

    hf_cfg = hf_import.read_hf_config(folder)
    cfg, vocab = hf_import.experiment_from_hf(hf_cfg)
    cfg = checkpoint_io.single_process(cfg)
    tensors = hf_import.SafetensorsFolder(folder)
    out = _load_and_save(args, folder, cfg, vocab,
                         lambda padded: hf_import.stock_state(cfg, hf_cfg, tensors, padded))
    arch = hf_cfg.get("architectures", [hf_cfg.get("model_type")])[0]
    return (f"imported stock {arch} {folder} as a vanilla (r=1) model-only checkpoint at {out}. "
            f"Upcycle with `rexmoe-convert upcycle {out} OUT -r R`, or train with:\n  rexmoe-train "
            f"checkpoint.load={out} checkpoint.load_optimizer=false {hf_import.training_overrides(cfg)}")


def _load_and_save(args, folder: Path, cfg, vocab: int, make_state) -> Path:
    """Build the 1-process model, check and load ``make_state(padded_vocab)``, save it model-only."""
    import torch

    from rexmoe_train.convert import checkpoint_io

    model = checkpoint_io.build_single_process(cfg, vocab)
    state = make_state(model.vocab_size)
    chunk = model.chunks[0]
    expected = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    for key, value in expected.items():
        if key not in state:
            raise _error(f"{folder}: tensor {key} missing")
        if tuple(state[key].shape) != tuple(value.shape):
            raise _error(f"{folder}: {key} has shape {tuple(state[key].shape)}, the config needs "
                         f"{tuple(value.shape)}")
    with torch.no_grad():
        chunk.load_state_dict(state, strict=False)
    return checkpoint_io.save_model(cfg, model, vocab, Path(args.out), step=args.step, source=str(folder),
                                    overwrite=args.overwrite)


def _upcycle(args) -> str:
    import torch

    from rexmoe_train.convert import checkpoint_io
    from rexmoe_train.convert.transforms import upcycle, upcycle_config

    vanilla_cfg, vanilla, meta = checkpoint_io.load_model(Path(args.checkpoint))
    step = meta["step"]
    target = upcycle_config(vanilla_cfg, args.reuse_group_size, start_step=step + 1)
    state = upcycle(vanilla_cfg, vanilla.chunks[0].state_dict(), target)
    vocab = int(meta["model"]["model.vocab_size"])
    model = checkpoint_io.build_single_process(target, vocab)
    with torch.no_grad():
        result = model.chunks[0].load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing:
        raise _error(f"upcycle: the target model has tensors the source lacks: {missing[:3]}")
    out = checkpoint_io.save_model(target, model, vocab, Path(args.out), step=step,
                                   source=str(Path(args.checkpoint).resolve()), overwrite=args.overwrite,
                                   owner=_owner(args))
    psr = target.rexmoe.psr
    return (f"upcycled {checkpoint_io.describe_meta(meta)} to r={args.reuse_group_size} at {out}; "
            f"PSR keeps each layer's own experts until step {psr.start_step} (mask on logits) and opens "
            f"to r*N by step {psr.end_step}. Continue with:\n  rexmoe-train checkpoint.load={out} "
            f"rexmoe.reuse_group_size={args.reuse_group_size} rexmoe.psr.schedule={psr.schedule} "
            f"rexmoe.psr.mask_on=logits rexmoe.psr.protect_local=true rexmoe.psr.start_step={psr.start_step} "
            f"rexmoe.psr.end_step={psr.end_step} <the rest of the original run's overrides>")


def _inspect(args) -> str:
    from rexmoe_train.convert import checkpoint_io
    from rexmoe_train.tools.dry_run import parameter_counts

    iter_dir = checkpoint_io.resolve(Path(args.checkpoint))
    cfg, meta = checkpoint_io.read_checkpoint_config(iter_dir)
    vocab = int(meta["model"]["model.vocab_size"])
    if args.ep is not None:
        n = cfg.model.num_moe_experts
        if args.ep < 1 or n % args.ep:
            allowed = ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)
            raise _error(f"--ep {args.ep}: the expert-parallel size must divide model.num_moe_experts "
                         f"({n}): one of {allowed}")
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, expert_model_parallel_size=args.ep))
    from rexmoe_train.core.placement import ExpertPlacement

    plan = cfg.reuse_plan()
    counts = parameter_counts(cfg, vocab)
    group = plan.groups[0]
    placement = ExpertPlacement(group.experts_per_layer, group.size, cfg.parallel.expert_model_parallel_size)
    m, r = cfg.model, cfg.rexmoe
    lines = [
        f"checkpoint: {iter_dir}",
        f"  {checkpoint_io.describe_meta(meta)}",
        f"model: {m.num_layers} layers ({m.first_k_dense_layers} dense), hidden {m.hidden_size}, heads "
        f"{m.num_attention_heads}/{m.num_query_groups or m.num_attention_heads}, top-{m.moe_router_topk} of "
        f"{m.num_moe_experts} experts x {m.moe_ffn_hidden_size}, shared {m.moe_shared_expert_intermediate_size}",
        f"rexmoe: r={r.reuse_group_size} ({len(plan.groups)} groups), gating {r.gating}, PSR {r.psr.schedule} "
        f"{r.psr.start_step}->{r.psr.end_step} (mask on {r.psr.mask_on}, protect_local={r.psr.protect_local})",
        "parameters: total {total:,}; active per token {active_per_token:,}; experts {experts:,}; "
        "routers {routers:,} (+{router_overhead_vs_vanilla:,} vs vanilla, {pct:.3f}%)".format(
            pct=100 * counts["router_overhead_vs_vanilla"] / counts["total"], **counts),
        placement.describe(),
    ]
    return "\n".join(lines)


def _owner(args) -> str:
    return f"rexmoe-convert {args.command}"


def _check_output(args) -> None:
    """Before any work: the output is none of the inputs, no checkpoint or run dir, and (with
    --overwrite) only ever an earlier output of the same verb (rexmoe_train/tools/outputs.py)."""
    from rexmoe_train.tools import outputs

    if args.command == "inspect":
        return
    inputs = [args.hf_dir] if args.command == "import-hf" else [args.checkpoint]
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer and tokenizer != "byte":
        inputs.append(tokenizer)
    try:
        outputs.check_output_dir(args.out, inputs, _owner(args), args.overwrite)
    except outputs.OutputError as err:
        raise _error(str(err)) from None


def _error(message: str) -> Exception:
    from rexmoe_train.convert.hf_format import ConvertError

    return ConvertError(message)


OVERWRITE_HELP = ("replace OUT when it is an earlier output of this same verb (it holds .rexmoe-output.json "
                  "and nothing else); anything else is never replaced")


class _OneLineParser(argparse.ArgumentParser):
    """argparse's usage errors as one line (its default prints the usage block first), exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="rexmoe-convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export-hf", help="checkpoint -> stock Qwen2-MoE folder (or --compact)")
    e.add_argument("checkpoint")
    e.add_argument("out")
    e.add_argument("--compact", action="store_true", help="experts stored once + mapping (our loader)")
    e.add_argument("--tokenizer", help="the tokenizer.json or Hugging Face tokenizer folder the training data "
                                       "was preprocessed with, or byte (the default for a model trained on bytes)")
    e.add_argument("--eod-token", help="the tokenizer's end-of-document token (default: as rexmoe-preprocess "
                                       "finds it)")
    e.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    e.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="weights dtype of the export; bf16 halves the memory a large model needs")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(run=_export)
    i = sub.add_parser("import-hf", help="an export of ours or a stock Qwen2/Qwen3-MoE folder -> "
                                       "model-only training checkpoint")
    i.add_argument("hf_dir")
    i.add_argument("out")
    i.add_argument("--step", type=int, default=1,
                   help="the step the checkpoint claims, >= 1 (default 1: checkpoints record completed steps)")
    i.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    i.set_defaults(run=_import)
    u = sub.add_parser("upcycle", help="vanilla MoE checkpoint -> ReXMoE checkpoint")
    u.add_argument("checkpoint")
    u.add_argument("out")
    u.add_argument("--reuse-group-size", "-r", type=int, required=True)
    u.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    u.set_defaults(run=_upcycle)
    s = sub.add_parser("inspect", help="config, layout, parameter counts, placement map")
    s.add_argument("checkpoint")
    s.add_argument("--ep", type=int, default=None, help="show the placement for this expert-parallel size")
    s.set_defaults(run=_inspect)
    return p


def main(argv=None) -> int:
    if argv is None:  # the console script itself, not a test calling main(argv) in-process
        from rexmoe_train.resilience.stray_errors import route_stray_errors

        route_stray_errors()  # "Exception ignored in ..." and thread tracebacks: off the terminal
    import warnings

    # torch.distributed.checkpoint warns about its own deprecations on every load/save
    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parser().parse_args(argv)
    from rexmoe_train import compat
    from rexmoe_train.config.schema import ConfigError
    from rexmoe_train.convert.hf_format import ConvertError

    try:
        _check_output(args)  # before anything is read, built or written
        compat.install()  # before the first megatron import
        print(args.run(args), flush=True)
    except (ConvertError, ConfigError) as err:
        print(f"rexmoe-convert {args.command}: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path that cannot be read or written: the user's to fix, not a bug
        where = f": {err.filename}" if err.filename else ""
        print(f"rexmoe-convert {args.command}: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
