"""-c/--config TOML files: defaults < file < command line; unknown keys and wrong types are one-line errors."""


import pytest

from slowllama.cli import build_parser, settings_from
from slowllama.settings import COMMANDS

from conftest import assert_one_line_error, run_cli


def parse(*argv):
    ns = build_parser().parse_args([str(a) for a in argv])
    return settings_from(COMMANDS[ns.command][0], ns, ns.command)


def test_precedence_defaults_config_command_line(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('store = "from-config"\ndata = "train.jsonl"\nlr = 0.5\nsteps = 7\npack = false\n'
                   'batch-size = 3\nval_split = 0.1\nweight_decay = 1\n')
    s = parse("finetune", "-c", cfg, "--lr", "0.25", "--pack")
    assert s.lr == 0.25 and s.pack is True  # the command line wins
    assert (s.steps, s.batch_size, s.val_split, s.data, s.store) == (7, 3, 0.1, "train.jsonl", "from-config")
    assert s.weight_decay == 1.0 and isinstance(s.weight_decay, float)  # a TOML integer for a float setting
    assert s.seq_len == 128 and s.mask_prompt is True  # defaults
    assert parse("finetune", "positional-store", "-c", cfg).store == "positional-store"
    assert parse("finetune", "-c", cfg, "--no-pack").pack is False
    # other commands read config files the same way
    (tmp_path / "eval.toml").write_text('seq_len = 64\nmask-prompt = false\n')
    e = parse("eval", "s", "--config", tmp_path / "eval.toml", "--data", "x.txt")
    assert (e.seq_len, e.mask_prompt, e.data) == (64, False, "x.txt")


@pytest.mark.parametrize("text, fragments", [
    ("lrr = 0.1\n", ("unknown key 'lrr'", "not a setting of `slowllama finetune`", "did you mean lr?")),
    ("steps = \"ten\"\n", ("steps must be an integer, got str 'ten'",)),
    ("steps = 2.5\n", ("steps must be an integer, got float",)),
    ("lr = true\n", ("lr must be a number, got bool",)),
    ("pack = \"yes\"\n", ("pack must be a boolean (true or false), got str",)),
    ("data = 5\n", ("data must be a string, got int",)),
    ("optimizer = \"adam\"\n", ("optimizer must be one of auto, sgd, adamw, lion, got 'adam'",)),
    ("[finetune]\nlr = 0.1\n", ("unknown key 'finetune'",)),
    ("batch_size = 2\nbatch-size = 3\n", ("batch_size is given twice",)),
    ("lr = \n", ("not valid TOML",)),
])
def test_bad_config_files(cli, tmp_path, text, fragments):
    cfg = tmp_path / "run.toml"
    cfg.write_text(text)
    assert_one_line_error(cli("finetune", tmp_path / "store", "-c", cfg, "--data", "x.txt"), str(cfg), *fragments)


def test_config_file_errors_from_the_command(cli, tmp_path):
    assert_one_line_error(cli("finetune", "s", "-c", tmp_path / "none.toml"), "none.toml", "config file not found")
    (tmp_path / "e.toml").write_text("steps = 3\n")  # a finetune setting, not an eval one
    assert_one_line_error(cli("eval", "s", "-c", tmp_path / "e.toml"), "e.toml", "unknown key 'steps'",
                          "`slowllama eval`")
    assert_one_line_error(cli("finetune", "--data", "x.txt"), "STORE: required")
    # the real command line: exit 2, one line, no traceback
    (tmp_path / "bad.toml").write_text("seq_len = \"long\"\n")
    proc = run_cli("finetune", "s", "-c", tmp_path / "bad.toml")
    assert proc.returncode == 2
    assert_one_line_error(proc, "bad.toml", "seq_len must be an integer")


def test_help_documents_every_flag_with_its_default():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and action.dest not in ("help", "version"):
                assert ("(default: " in action.help or "default:" in action.help
                        or action.help.endswith("(required)")), (name, action.option_strings)
    text = sub.choices["finetune"].format_help()
    for flag in ("--pack, --no-pack", "--mask-prompt, --no-mask-prompt", "--val-split", "-c FILE, --config FILE",
                 "--skip-bad-lines"):
        assert flag in text
