"""Write a ReXMoE model as a stock Hugging Face Qwen2-MoE folder (unrolled) or as a compact folder.

Streaming: tensors are produced and written one decoder layer at a time (one safetensors shard per
layer). The source is either a 1-process state dict (the whole model in memory) or a
:class:`~rexmoe_train.convert.dcp_reader.StreamedCheckpoint`, which reads each layer (and its reuse
group's expert bank) from the checkpoint files only when that layer is written: peak memory is then
one layer plus the embeddings, whatever the depth (docs/benchmarks.md, "Checkpoint conversion memory").
Both sources give bitwise-identical files (tests/convert/test_dcp_reader.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.convert.hf_format import (
    ConvertError,
    check_exportable,
    hf_config,
    hf_layer_tensors,
    hf_outer_tensors,
)
from rexmoe_train.tools.outputs import OutputError, write_dir

EXPORT_META = "rexmoe_export.json"
BYTE_EOD_TOKEN = "<|endoftext|>"  # the byte tokenizer's id 256 in an export (training only knows the id)
_PROBE = "Probe: does the template add tokens? 1 2 3"


@dataclass
class ExportTokenizer:
    """The tokenizer files an export ships, the end-of-document id, and what was changed."""

    files: dict = field(default_factory=dict)  # file name -> text
    eos_token_id: int = 0
    note: str = ""


def _byte_chars() -> list[str]:
    """Byte b -> the printable character byte-level tokenizers stand it for: printable Latin-1
    bytes stand for themselves, the other 68 take the code points from 256 on, in byte order (the
    table the `tokenizers` ByteLevel pre-tokenizer and decoder use)."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer_json() -> str:
    """A tokenizer.json that gives exactly ByteTokenizer's ids: each UTF-8 byte b is id b (a BPE
    with the 256 byte characters and no merges, after the ByteLevel pre-tokenizer without regex
    splitting), end of document is id 256 (``<|endoftext|>``); decoding turns bytes back into text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(_byte_chars())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOD_TOKEN, special=True)])
    assert tok.token_to_id(BYTE_EOD_TOKEN) == 256
    return tok.to_str(pretty=True)


def _tokenizer_config(eod_token: str, max_length: int, literal_specials_are_text: bool) -> str:
    # tokenizer_class: without it transformers takes the class of the model type (Qwen2Tokenizer),
    # which rebuilds its own pre-tokenizer and splits text differently from tokenizer.json
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_token, "pad_token": eod_token,
              "model_max_length": max_length, "clean_up_tokenization_spaces": False}
    if literal_specials_are_text:
        # the byte tokenizer encodes the text "<|endoftext|>" as its 13 bytes: so must the export
        config["split_special_tokens"] = True
    return json.dumps(config, indent=2)


def export_tokenizer(spec: str, cfg: ExperimentConfig, trained_vocab_size: Optional[int] = None,
                     eod_token: Optional[str] = None) -> ExportTokenizer:
    """The tokenizer an export ships: ``spec`` is "byte" or the tokenizer.json the data was
    preprocessed with. ``AutoTokenizer`` on the export gives exactly the training ids: those of
    rexmoe-preprocess, which encodes without the tokenizer's special-token template."""
    from tokenizers import Tokenizer

    from rexmoe_train.data.text_tokenizer import TokenizerLoadError, load_tokenizer

    try:
        tok = load_tokenizer(spec, eod_token)
    except TokenizerLoadError as err:
        raise ConvertError(f"--tokenizer: {err}") from None
    trained = cfg.model.vocab_size or trained_vocab_size
    if trained is not None and (tok.vocab_size > trained or (cfg.model.vocab_size is None
                                                             and tok.vocab_size != trained)):
        raise ConvertError(f"--tokenizer {spec}: {tok.vocab_size} ids, but the checkpoint was trained with a "
                           f"vocabulary of {trained} (data.tokenizer={cfg.data.tokenizer}): pass the "
                           "tokenizer its data was preprocessed with")
    max_length = cfg.model.max_position_embeddings or cfg.train.seq_length
    if spec == "byte":
        return ExportTokenizer({"tokenizer.json": byte_tokenizer_json(),
                                "tokenizer_config.json": _tokenizer_config(BYTE_EOD_TOKEN, max_length, True)},
                               tok.eod)
    text, note = tok.json_text(), ""  # a tokenizer.json file or a Hugging Face tokenizer folder
    hf = Tokenizer.from_str(text)
    if hf.encode(_PROBE, add_special_tokens=True).ids != hf.encode(_PROBE, add_special_tokens=False).ids:
        # a template (BOS/EOS around every text) that training never applied: drop it, or the
        # exported tokenizer would feed the model ids it never saw
        data = json.loads(text)
        data["post_processor"] = None
        text = json.dumps(data, ensure_ascii=False, indent=2)
        note = "removed the tokenizer's special-token template (training data was encoded without it)"
    return ExportTokenizer({"tokenizer.json": text,
                            "tokenizer_config.json": _tokenizer_config(tok.eod_token, max_length, False)},
                           tok.eod, note)


def bank_experts(state: dict, group_index: int, num_candidates: int) -> list:
    """(fc1, fc2) of a group's experts in candidate order (1-process model: slot == candidate)."""
    prefix = f"expert_banks.banks.{group_index}.local_experts"
    return [(state[f"{prefix}.{c}.linear_fc1.weight"], state[f"{prefix}.{c}.linear_fc2.weight"])
            for c in range(num_candidates)]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _file_mode() -> int:
    """The mode a plain new file gets here (0644 under the usual umask 022)."""
    umask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(umask)
    return 0o666 & ~umask


def _write_shards(out: Path, shards: Iterable[tuple[str, Iterable]], total: int,
                  progress: bool, dtype: Optional[torch.dtype] = None) -> dict:
    """Write each (label, tensors) as one safetensors file. ``shards`` may be lazy: a streamed source
    reads a part only when its shard is written, and nothing of a shard outlives its file."""
    from tqdm import tqdm  # here, not at module level: importing rexmoe_train must not need tqdm

    weight_map, written, mode = {}, 0, _file_mode()
    bar = tqdm(total=total, desc="export", unit="shard", disable=not progress)
    try:
        for index, (label, tensors) in enumerate(shards):
            name = f"model-{index + 1:05d}-of-{total:05d}.safetensors"
            bar.set_postfix_str(f"{label}, {_human(written)} written", refresh=True)
            # clone: safetensors refuses views that share storage (gate/up halves of one fc1)
            block = {k: v.detach().to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype)
                     .contiguous().clone() for k, v in tensors}
            del tensors
            save_file(block, str(out / name), metadata={"format": "pt", "part": label})
            # safetensors (0.8) creates its files with mode 0600 whatever the umask: give the shard
            # the mode config.json gets, so whoever may read the export can read its weights
            os.chmod(out / name, mode)
            for key in block:
                weight_map[key] = name
            del block
            written += (out / name).stat().st_size
            bar.set_postfix_str(f"{label}, {_human(written)} written", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    return weight_map


def _write_index(folder: Path, weight_map: dict) -> None:
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1, sort_keys=True))


EXPORT_OWNER = "rexmoe-convert export-hf"  # the mark an export carries (tools/outputs.py)


def _atomic_dir(out: Path, write: Callable[[Path], None], overwrite: bool, owner: str = EXPORT_OWNER) -> Path:
    """Write into a fresh hidden sibling, mark it as ``owner``'s, then rename: a failed export leaves
    nothing half-written, and ``overwrite`` replaces only an earlier output of ``owner``."""
    try:
        return write_dir(out, owner, overwrite, write)
    except OutputError as err:
        raise ConvertError(str(err)) from None


class DictSource:
    """A whole 1-process state dict, served in the parts a StreamedCheckpoint serves."""

    def __init__(self, state: dict) -> None:
        self.state = {k: v for k, v in state.items() if torch.is_tensor(v) and not k.endswith("_extra_state")}

    @staticmethod
    def part_of(key: str) -> str:
        if key.startswith("decoder.layers."):
            return f"layer {key.split('.')[2]}"
        if key.startswith("expert_banks.banks."):
            return f"bank {key.split('.')[2]}"
        return "outer"

    def load_part(self, part: str) -> dict:
        return {k: v for k, v in self.state.items() if self.part_of(k) == part}

    def keys(self) -> list[str]:
        return list(self.state)

    def load(self, keys) -> dict:
        return {k: self.state[k] for k in keys}


def as_source(state):
    """A state dict or a StreamedCheckpoint -> something with ``load_part(part)``."""
    return state if hasattr(state, "load_part") else DictSource(state)


def _compact_shards(cfg: ExperimentConfig, keys: Iterable[str]) -> list[tuple[str, list[str]]]:
    """(label, keys) of the compact export's shards: embeddings + final norm + head, each decoder
    layer, then each reuse group's experts split by owner MoE layer (N experts a shard), so a shard
    stays about one layer's worth of tensors however large r makes a bank."""
    plan = cfg.reuse_plan()
    n = cfg.model.num_moe_experts
    labels = ["embeddings+head"] + [f"layer {i}" for i in range(cfg.model.num_layers)]
    for group in plan.groups:
        labels += [f"bank {group.index} experts of MoE layer {group.first_moe_layer + j}" for j in range(group.size)]
    shards: dict[str, list[str]] = {label: [] for label in labels}
    for key in keys:
        parts = key.split(".")
        if key.startswith("decoder.layers."):
            label = f"layer {parts[2]}"
        elif key.startswith("expert_banks.banks."):
            group = plan.groups[int(parts[2])]
            label = f"bank {group.index} experts of MoE layer {group.first_moe_layer + int(parts[4]) // n}"
        else:
            label = "embeddings+head"
        shards[label].append(key)
    return [(label, names) for label, names in shards.items() if names]


def export_hf(cfg: ExperimentConfig, state, vocab_size: int, out: Path, *,
              tokenizer_vocab_size: Optional[int] = None, tokenizer: Optional[ExportTokenizer] = None,
              source: str = "", overwrite: bool = False, progress: bool = True) -> Path:
    """Unrolled Qwen2-MoE export of a 1-process ReXMoE state dict (PSR fully open).

    ``state``: the 1-process state dict, or a StreamedCheckpoint (reads one layer at a time).
    ``vocab_size`` is the (padded) embedding size; ``tokenizer_vocab_size`` the tokenizer's, which
    a later import-hf needs to give the training checkpoint the same signature. ``tokenizer``
    (:func:`export_tokenizer`): its files are written and its end-of-document id becomes the
    model's ``eos_token_id`` (config.json and generation_config.json)."""
    check_exportable(cfg)
    config = hf_config(cfg, vocab_size)
    if tokenizer is not None:
        config["eos_token_id"] = config["pad_token_id"] = tokenizer.eos_token_id
    plan = cfg.reuse_plan()
    src = as_source(state)

    def shards():
        yield "embeddings+head", hf_outer_tensors(cfg, src.load_part("outer"))
        bank_index, bank = None, None
        for layer in range(cfg.model.num_layers):
            experts = []
            if plan.is_moe_layer(layer + 1):
                group = plan.group_of(plan.moe_index(layer + 1))
                if bank_index != group.index:
                    bank_index, bank = None, None  # free the previous group's bank before reading
                    bank_index, bank = group.index, src.load_part(f"bank {group.index}")
                experts = bank_experts(bank, group.index, group.num_candidates)
            yield f"layer {layer}", hf_layer_tensors(cfg, src.load_part(f"layer {layer}"), layer, experts)
            experts = None

    def write(tmp: Path) -> None:
        dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
        total = 1 + cfg.model.num_layers
        _write_index(tmp, _write_shards(tmp, shards(), total, progress, dtype))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        meta = _export_meta(cfg, source, compact=False) | {"vocab_size": tokenizer_vocab_size or vocab_size}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            for name, text in tokenizer.files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            (tmp / "generation_config.json").write_text(json.dumps(
                {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.eos_token_id}, indent=2))

    return _atomic_dir(out, write, overwrite)


def export_compact(cfg: ExperimentConfig, state, vocab_size: int, out: Path, *, source: str = "",
                   overwrite: bool = False, progress: bool = True) -> Path:
    """Our own parameter names, each expert once, plus the resolved config: loadable by import-hf.

    In the model's dtypes, one shard per part (see _compact_shards); ``state`` as for
    :func:`export_hf`."""
    src = as_source(state)
    plan = _compact_shards(cfg, src.keys())

    def write(tmp: Path) -> None:
        shards = ((label, src.load(keys).items()) for label, keys in plan)
        _write_index(tmp, _write_shards(tmp, shards, len(plan), progress))
        (tmp / EXPORT_META).write_text(json.dumps(
            _export_meta(cfg, source, compact=True) | {"vocab_size": vocab_size}, indent=2))

    return _atomic_dir(out, write, overwrite)


def _export_meta(cfg: ExperimentConfig, source: str, compact: bool) -> dict:
    import dataclasses

    target = "qwen3_moe" if cfg.model.qk_layernorm else "qwen2_moe"
    return {"format": "rexmoe-compact" if compact else f"{target}-unrolled", "source": source,
            "experiment": dataclasses.asdict(cfg)}


def load_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if not index.exists():
        raise ConvertError(f"{folder}: no model.safetensors.index.json (not an export of ours)")
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError) as err:
        raise ConvertError(f"{index}: unreadable index ({err.__class__.__name__})") from None
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except Exception as err:  # truncated / corrupt file: safetensors raises its own errors
            raise ConvertError(f"{folder / name}: cannot read safetensors ({err})") from None
    return tensors
