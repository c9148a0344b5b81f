"""Writes reference/cli.md at build time from the command-line tools' argparse parsers,
so that the reference cannot drift from the code. (No well-kept MkDocs plugin renders
argparse parsers: mkdocs-click is for Click; this is the small part written by hand.)"""

import argparse
import importlib

import mkdocs_gen_files

TOOLS = [
    ("xa-generate", "xa_runtime.cli.generate"),
    ("xa-export", "xa_runtime.cli.export"),
    ("xa-build-engines", "xa_runtime.cli.build_engines"),
    ("xa-bench", "xa_runtime.cli.bench"),
    ("xa-serve", "xa_runtime.cli.serve"),
    ("xa-train", "xa_runtime.cli.train"),
]


def parser_of(module_name: str) -> argparse.ArgumentParser:
    module = importlib.import_module(module_name)
    return module.build_parser()


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def option_row(action: argparse.Action, prog: str) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
    meta = "" if action.nargs == 0 else f" `{action.metavar or action.dest.upper()}`"
    help_text = (action.help or "") % {"default": action.default, "prog": prog} if action.help else ""
    extra = []
    if action.choices:
        extra.append("choices: " + ", ".join(f"`{c}`" for c in action.choices))
    if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in (action.help or ""):
        extra.append(f"default: `{action.default}`")
    return f"| {names}{meta} | {cell(help_text)}{' (' + '; '.join(extra) + ')' if extra else ''} |"


with mkdocs_gen_files.open("reference/cli.md", "w") as out:
    out.write("# Command-line reference\n\nGenerated from the parsers at build time.\n\n")
    for prog, module_name in TOOLS:
        parser = parser_of(module_name)
        out.write(f"## {prog}\n\n{cell(parser.description or '')}\n\n```text\n{parser.format_usage().strip()}\n```\n\n")
        out.write("| flag | meaning |\n|---|---|\n")
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:
                continue
            out.write(option_row(action, prog) + "\n")
        out.write("\n")
