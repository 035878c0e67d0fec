"""The scaling runs' text: English the project never trained on, frozen once into run files.

Validation: the package descriptions (``METADATA``) of the distributions installed in the venv, the
unseen-text set of docs/ablation_tiny.md sections 3 and 6, split by document in name order: the last
20% are the validation documents, never trained on. Training: the first 80% of those descriptions
plus the English manual pages of this machine (sections 2-8 of /usr/share/man), rendered to plain
text by :func:`troff_to_text`, so that 6M training tokens are well under one epoch (the descriptions
alone are about 0.95M training tokens).

One indexed dataset holds the documents in the order [manual pages, train descriptions, validation
descriptions]; megatron splits documents by position, so ``data.split`` = "<train docs>,<valid
docs>,0" puts exactly the validation descriptions in the validation split. Both sources change when
packages are installed: the corpus is built once and reused (its SHA-256 is in manifest.json).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
MAN_SECTIONS = ("man2", "man3", "man4", "man5", "man6", "man7", "man8")
VALID_SHARE = 0.2  # of the descriptions, by document (docs/ablation_tiny.md section 3's 80/20)
MIN_PAGE_BYTES = 400  # stubs (".so other.1") and near-empty pages are skipped

_ESCAPES = [
    (re.compile(r'\\".*$'), ""),                      # comment to end of line
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),      # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),                 # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),     # string interpolation
    (re.compile(r"\\n(\[[^\]]*\]|\(..|.)"), ""),      # register interpolation
    (re.compile(r"\\\((em|en|hy)"), "-"),
    (re.compile(r"\\\((bu|bb)"), "*"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(.."), ""),
    (re.compile(r"\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\[e\\]"), "\\\\"),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\[&|^%:c]"), ""),
]
# request / macro lines whose arguments are running text (the rest are layout and are dropped)
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SB", "SM", "TH", "IP", "TP",
                "Nm", "Nd", "Sh", "Ss", "Fl", "Ar", "Op", "Pa", "Xr", "Dl", "It", "Em", "Sy", "Cm", "Ic",
                "Va", "Fn", "Fa", "Ft", "Dv", "Er", "Ev", "Li", "Ql", "Dq", "Sq", "Pq", "UR", "MT"}


def troff_to_text(source: str) -> str:
    """Plain text of a man page's troff source: macros' text arguments kept, layout dropped."""
    out, skipping = [], False
    for line in source.splitlines():
        if skipping:  # inside a macro definition (.de ... ..)
            skipping = line.strip() != ".."
            continue
        if line[:1] in (".", "'"):
            parts = line[1:].strip().split(None, 1)
            name = parts[0] if parts else ""
            if name in ("de", "de1", "am", "ig"):
                skipping = True
                continue
            if name not in _TEXT_MACROS or len(parts) < 2:
                if out and out[-1]:
                    out.append("")
                continue
            line = parts[1].replace('"', "")
            if name in ("SH", "SS", "Sh", "Ss", "TH"):  # a heading is a paragraph of its own
                out += ["", line, ""]
                continue
        for pattern, replacement in _ESCAPES:
            line = pattern.sub(replacement, line)
        out.append(line)
    # troff fills lines into paragraphs: so does this (blank lines separate paragraphs)
    paragraphs = re.split(r"\n\s*\n", "\n".join(out))
    filled = (" ".join(p.split()) for p in paragraphs)
    return "\n\n".join(p for p in filled if p) + "\n"


def man_pages() -> list[tuple[str, str]]:
    """(name, text) of every English manual page in MAN_SECTIONS, sorted by path, de-duplicated."""
    seen, pages = set(), []
    for section in MAN_SECTIONS:
        for path in sorted((MAN_ROOT / section).glob("*")):
            try:
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            except (OSError, gzip.BadGzipFile, EOFError):
                continue
            text = troff_to_text(raw.decode("utf-8", errors="replace"))
            digest = hashlib.sha256(text.encode()).digest()
            if len(text.encode()) < MIN_PAGE_BYTES or digest in seen:
                continue
            seen.add(digest)
            pages.append((f"{section}/{path.name}", text))
    return pages


def descriptions(site_packages: Path) -> list[tuple[str, str]]:
    """(name, text) of every installed distribution's METADATA, sorted by distribution folder."""
    out = []
    for path in sorted(site_packages.glob("*.dist-info/METADATA")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            out.append((path.parent.name, text))
    return out


def build(out: Path, site_packages: Path) -> dict:
    """Writes out/corpus.jsonl, the indexed dataset out/unseen.{bin,idx,json} and out/manifest.json."""
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    pages, docs = man_pages(), descriptions(site_packages)
    n_valid = max(1, round(VALID_SHARE * len(docs)))
    train_docs, valid_docs = docs[: len(docs) - n_valid], docs[len(docs) - n_valid:]
    ordered = [("man", n, t) for n, t in pages] + [("meta_train", n, t) for n, t in train_docs] \
        + [("meta_valid", n, t) for n, t in valid_docs]
    jsonl = out / "corpus.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for _, _, text in ordered:
            f.write(json.dumps({"text": text}) + "\n")
    prefix = out / "unseen"
    from rexmoe_train.cli.preprocess import main as preprocess

    status = preprocess(["--input", str(jsonl), "--output-prefix", str(prefix), "--workers", "1", "--no-progress",
                         "--overwrite"])
    if status:
        raise RuntimeError(f"rexmoe-preprocess exited with status {status} on {jsonl}")
    sha = hashlib.sha256(jsonl.read_bytes()).hexdigest()

    def size(kind):
        return sum(len(t.encode()) for k, _, t in ordered if k == kind)

    manifest = {
        "prefix": str(prefix), "corpus_sha256": sha, "documents": len(ordered),
        "train_documents": len(ordered) - n_valid, "valid_documents": n_valid,
        "split": f"{len(ordered) - n_valid},{n_valid},0",
        "bytes": {"man": size("man"), "meta_train": size("meta_train"), "meta_valid": size("meta_valid")},
        "man_sections": list(MAN_SECTIONS), "man_pages": len(pages),
        "valid_distributions": [n for n, _ in valid_docs],
        "train_distributions": [n for n, _ in train_docs],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def ensure(out: Path, site_packages: Path) -> dict:
    """The corpus manifest of ``out``; the corpus is built first when ``out`` holds none. Never
    rebuilt once there: the runs of later sessions must see the same tokens."""
    path = out / "manifest.json"
    if path.is_file():
        manifest = json.loads(path.read_text())
        missing = [ext for ext in ("bin", "idx", "json") if not Path(f"{manifest['prefix']}.{ext}").is_file()]
        if missing:
            raise FileNotFoundError(f"{manifest['prefix']}.{missing[0]} is missing: the corpus of {path} "
                                    f"is incomplete (move {out} aside to rebuild it)")
        return manifest
    return build(out, site_packages)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--site-packages", type=Path, required=True)
    a = p.parse_args()
    print(json.dumps({k: v for k, v in build(a.out, a.site_packages).items()
                      if not k.endswith("distributions")}, indent=2))
