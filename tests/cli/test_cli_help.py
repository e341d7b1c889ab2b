"""The command line's help is complete: every option of every subcommand has a
help text, and the exit codes the top-level help lists are exactly the ones
the code returns (the EXIT_* constants of mlsem.cli.output)."""
import argparse
import ast
import inspect
import re

import pytest

from mlsem.cli import fit as cli_fit
from mlsem.cli import main as cli


def subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sp in action.choices.items():
                yield name, sp, helps.get(name)


def exit_constants():
    return {k: v for k, v in vars(cli).items() if k.startswith("EXIT_") and isinstance(v, int)}


def test_every_option_of_every_subcommand_has_help():
    parser = cli.build_parser()
    missing = []
    subs = list(subparsers(parser))
    assert {name for name, _, _ in subs} >= {"fit", "simulate", "predict", "diagram", "wide", "example"}
    for name, sp, sub_help in subs:
        if not (sub_help or "").strip():
            missing.append(f"{name} (the subcommand itself)")
        for action in sp._actions:
            if action.help == argparse.SUPPRESS or not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip():
            missing.append(f"mlsem {'/'.join(action.option_strings)}")
    assert not missing, "options without a help text: " + ", ".join(missing)


def test_exit_codes_in_the_help_are_the_codes_of_the_code():
    epilog = cli.build_parser().epilog
    m = re.search(r"exit codes:(.*)", epilog, re.S)
    assert m, "the top-level help does not list the exit codes"
    listed = [int(x) for x in re.findall(r"(?:^|;)\s*(\d+)\s", m.group(1))]
    assert len(listed) == len(set(listed))
    assert set(listed) == set(exit_constants().values())


def test_commands_return_only_the_listed_exit_codes():
    """main() and every _cmd_* return an EXIT_* constant (or a variable set
    from them), never a bare number the help does not list."""
    consts = exit_constants()
    funcs = [f for mod in (cli, cli_fit) for f in ast.parse(inspect.getsource(mod)).body
             if isinstance(f, ast.FunctionDef) and (f.name == "main" or f.name.startswith("_cmd_"))]
    assert any(f.name == "main" for f in funcs) and any(f.name == "_cmd_fit" for f in funcs) and len(funcs) >= 7
    bad = []

    def check(node, where):
        if isinstance(node, ast.IfExp):
            check(node.body, where)
            check(node.orelse, where)
        elif isinstance(node, ast.Constant):
            bad.append(f"{where}: return {node.value!r}")
        elif isinstance(node, ast.Name) and node.id.isupper() and node.id not in consts:
            bad.append(f"{where}: return {node.id}")

    for f in funcs:
        for node in ast.walk(f):
            if isinstance(node, ast.Return) and node.value is not None:
                check(node.value, f"{f.name} line {node.lineno}")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code" for t in node.targets):
                check(node.value, f"{f.name} line {node.lineno}")
    assert not bad, "exit codes not from the EXIT_* constants: " + "; ".join(bad)


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args, argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_cmd_example", interrupted)
    assert cli.main(["example"]) == cli.EXIT_INTERRUPTED == 130
    assert "interrupted; nothing written" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["dot", "gv", "svg", "png", "pdf"])
def test_diagram_help_lists_every_format(fmt):
    from mlsem.results.diagram import FORMATS
    sp = dict((n, p) for n, p, _ in subparsers(cli.build_parser()))["diagram"]
    out = next(a for a in sp._actions if "--out" in a.option_strings)
    assert fmt in FORMATS
    assert f".{fmt}" in out.metavar and f".{fmt}" in out.help
