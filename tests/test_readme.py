"""The README stays true: its size table is computed, its commands and flags exist."""

import re

from slowllama.cli import build_parser
from slowllama.model.families import size_table

from conftest import REPO

README = (REPO / "README.md").read_text()
# code in the README: fenced blocks and `inline spans`
CODE = "\n".join(re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S) + re.findall(r"`([^`\n]+)`", README))
CODE = re.sub(r"\\\n\s*", " ", CODE)  # a command continued over lines (trailing backslash) is checked whole


def test_size_table_is_the_computed_one():
    block = README.split("<!-- size-table -->")[1].split("<!-- /size-table -->")[0].strip()
    assert block == size_table()


def test_commands_and_flags_in_the_readme_exist():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    used = set(re.findall(r"^\s*slowllama ([a-z-]+)", CODE, flags=re.M))
    assert used and used <= set(sub.choices), used - set(sub.choices)
    for command in used:
        flags = {opt for action in sub.choices[command]._actions for opt in action.option_strings}
        for line in CODE.splitlines():
            for call in re.findall(rf"^\s*slowllama {command} .*", line):
                for flag in re.findall(r"--[a-z][a-z-]*", call):
                    assert flag in flags, f"{command} {flag}"
