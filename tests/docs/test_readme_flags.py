"""The README's flag tables and its training command, and the examples/ launchers and READMEs
the series adds, against the patched tree's real argparse.

Every ``--flag`` in a README table column headed "flag"/"flags", and every ``--flag`` of the
README's ``pretrain_*.py`` command blocks, must be an option of the parser that
``megatron.training.arguments.add_megatron_arguments`` builds in ``build/Megatron-LM``; every
config field named in a "config field" column must be a TransformerConfig field. So the README
cannot document a flag that does not exist (it once listed ``--mamba-rms-norm``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from pathlib import Path

import pytest

pytestmark = pytest.mark.megatron

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# The examples the series adds to upstream's examples/ (READMEs and launchers).
EXAMPLES = ROOT / "megatron_overlay" / "examples"
FLAG_RE = re.compile(r"(?<![\w-])--[a-z0-9][\w-]*")

DUMP = """
import argparse, dataclasses, json
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.training.arguments import add_megatron_arguments
parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
options = sorted(o for a in parser._actions for o in a.option_strings)
fields = sorted(f.name for f in dataclasses.fields(TransformerConfig))
print("README-FLAGS " + json.dumps({"options": options, "fields": fields}))
"""


def readme_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Markdown tables as (header cells, rows of cells)."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            if len(block) >= 2 and set("".join(block[1])) <= set("-: "):
                tables.append((block[0], block[2:]))
            block = []
    return tables


def documented(text: str) -> tuple[set[str], set[str], list[str]]:
    """(flags of the flag tables, config fields of the field columns, flags of the commands)."""
    flags, fields = set(), set()
    for header, rows in readme_tables(text):
        lowered = [h.lower() for h in header]
        for row in rows:
            for name, cell in zip(lowered, row):
                if name in ("flag", "flags") or name.endswith(" flag"):
                    flags.update(FLAG_RE.findall(cell))
                elif "config field" in name:
                    fields.update(re.findall(r"`([a-z_][a-z0-9_]*)`", cell))
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.strip()
            match = re.search(r"\bpretrain_\w+\.py\b", command)
            if match and not command.startswith("#"):
                commands += FLAG_RE.findall(command[match.end() :].split("#", 1)[0])
    return flags, fields, commands


def launcher_flags(text: str) -> list[str]:
    """Flags of a bash launcher, except torchrun's own (the DISTRIBUTED_ARGS array)."""
    flags, skip = [], False
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        if re.match(r"\s*DISTRIBUTED_ARGS=\(", line):
            skip = True
        if not skip:
            flags += FLAG_RE.findall(line)
        if skip and ")" in line:
            skip = False
    return flags


_FACTS: dict = {}


@pytest.fixture
def parser_facts(megatron_tree) -> dict:
    """Options and config fields of the patched tree (computed once per session)."""
    if not _FACTS:
        env = dict(os.environ, PYTHONPATH=str(megatron_tree), CUDA_VISIBLE_DEVICES="")
        proc = subprocess.run(
            [sys.executable, "-c", DUMP],
            capture_output=True,
            text=True,
            env=env,
            cwd=megatron_tree,
            timeout=300,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("README-FLAGS ")]
        assert line, proc.stderr[-3000:]
        _FACTS.update(json.loads(line[-1].split(" ", 1)[1]))
    return _FACTS


def test_readme_flags_exist(parser_facts):
    flags, fields, commands = documented(README.read_text())
    # The tables are there and parsed (an empty set would make the test vacuous).
    assert {"--embedding-multiplier", "--no-mamba-rms-norm", "--use-bitnet"} <= flags
    assert {"embedding_multiplier", "mamba_rms_norm", "ssm_multipliers"} <= fields
    assert "--hybrid-layer-pattern" in commands
    options, known_fields = set(parser_facts["options"]), set(parser_facts["fields"])
    assert sorted(flags - options) == [], "README flag tables name flags argparse does not have"
    assert sorted(set(commands) - options) == [], "README command uses flags argparse lacks"
    assert sorted(fields - known_fields) == [], "README names config fields that do not exist"


def test_example_flags_exist(parser_facts):
    """The examples/ launchers and READMEs the series adds use only real flags."""
    options = set(parser_facts["options"])
    launchers = sorted(EXAMPLES.rglob("*.sh"))
    assert {p.name for p in launchers} >= {"train_falcon_h1_0.5b.sh", "train_gpt_bitnet.sh"}
    for path in launchers:
        flags = launcher_flags(path.read_text())
        assert "--hidden-size" in flags and "--nproc_per_node" not in flags, path
        assert sorted(set(flags) - options) == [], path
    for path in sorted(EXAMPLES.rglob("README.md")):
        flags, fields, commands = documented(path.read_text())
        assert sorted(flags - options) == [], path
    assert "--use-bitnet" in documented((EXAMPLES / "bitnet/README.md").read_text())[0]
    assert "--no-mamba-rms-norm" in documented((EXAMPLES / "falcon_h1/README.md").read_text())[0]


def test_parser_of_the_readme_test_sees_a_wrong_flag():
    """The table parser picks flags out of a table like the README's (so a wrong one fails)."""
    text = (
        "| flag | Falcon-H1 config field | default |\n|---|---|---|\n"
        "| `--mamba-rms-norm` / `--no-x` | `mamba_rms_norm` | on |\n\n"
        "```bash\ntorchrun a/pretrain_mamba.py \\\n  --bad-flag 1 --lr 3e-4\n"
        "#   pretrain_mamba.py --load ckpt\nconvert --save-dir x\n```\n"
    )
    flags, fields, commands = documented(text)
    assert flags == {"--mamba-rms-norm", "--no-x"}
    assert fields == {"mamba_rms_norm"}
    assert commands == ["--bad-flag", "--lr"]
    launcher = "DISTRIBUTED_ARGS=(\n  --nproc_per_node 8\n)\nARGS=(\n  --lr 1 # --no\n  --x_y\n)\n"
    assert launcher_flags(launcher) == ["--lr", "--x_y"]
