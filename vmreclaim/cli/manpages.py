"""Man pages and shell completion generated from the parser, so they cannot drift from it.

``python -m vmreclaim.cli.manpages [ROOT]`` writes ``man/vmreclaim.1``, one
``man/vmreclaim-COMMAND.1`` per command, ``completion/vmreclaim.bash`` and
``completion/_vmreclaim`` (zsh) under ROOT (default: the current directory). The output
depends only on the parser (no dates, fixed width), so a test regenerates it and compares
with the committed files. Written by hand on argparse's public data rather than with a
generator package: the ones that exist (argparse-manpage, shtab) add a dependency for
a few dozen lines, and shtab's zsh output would still need the plugin commands' walk.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from vmreclaim import __version__
from vmreclaim.cli.main import build_parser

WIDTH = 78
EXIT_STATUS = [
    ("0", "done"),
    ("1", "an unexpected error (a bug; a traceback with --debug)"),
    ("2", "bad usage or configuration, a missing optional extra, no daemon answering"),
    ("3", "the image is busy (another process holds it for writing)"),
    ("4", "the image is unsupported or corrupt; nothing was changed"),
]


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str]]:
    """``(path, parser, help)`` of every command and command group, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name, "")
                yield from commands(sub, (*path, name))


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    return [n for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices]


def options(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings]


def usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    return formatter.format_help().strip()


def roff(text: str) -> str:
    """Text safe in a roff paragraph: backslashes, dashes and leading dots escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in ".'" else line for line in text.splitlines())


def man_page(name: str, parser: argparse.ArgumentParser, summary: str, see_also: list[str]) -> str:
    out = [
        f'.TH {name.upper()} 1 "" "vmreclaim {__version__}" "vmreclaim manual"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(summary)}",
        ".SH SYNOPSIS",
        ".nf",
        roff(usage(parser)),
        ".fi",
    ]
    if parser.description:
        out += [".SH DESCRIPTION", roff(parser.description)]
    subs = [(a, n) for a in parser._actions if isinstance(a, argparse._SubParsersAction) for n in a.choices]
    if subs:
        out.append(".SH COMMANDS")
        for action, sub in subs:
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            out += [".TP", f"\\fB{roff(sub)}\\fR", roff(helps.get(sub, ""))]
    args = [a for a in parser._actions if not isinstance(a, argparse._SubParsersAction)]
    if args:
        out.append(".SH OPTIONS")
        for a in args:
            label = ", ".join(a.option_strings) or (a.metavar if isinstance(a.metavar, str) else a.dest)
            if a.option_strings and a.nargs != 0:
                label += " " + (a.metavar if isinstance(a.metavar, str) else a.dest.upper())
            out += [".TP", f"\\fB{roff(label)}\\fR", roff(a.help or "")]
    out.append(".SH EXIT STATUS")
    for code, meaning in EXIT_STATUS:
        out += [".TP", code, roff(meaning)]
    out += [".SH SEE ALSO", ",\n".join(f"\\fB{roff(s)}\\fR(1)" for s in see_also)]
    return "\n".join(out) + "\n"


def man_pages() -> dict[str, str]:
    """File name under ``man/`` -> contents."""
    parser = build_parser()
    leaves = [(p, sub, h) for p, sub, h in commands(parser) if not subcommands(sub)]
    names = ["vmreclaim-" + "-".join(p) for p, _, _ in leaves]
    pages = {"vmreclaim.1": man_page("vmreclaim", parser, parser.description or "", names)}
    for name, (_, sub, summary) in zip(names, leaves, strict=True):
        pages[f"{name}.1"] = man_page(name, sub, summary, ["vmreclaim"])
    return pages


def _table(parser: argparse.ArgumentParser) -> list[tuple[str, list[str], list[str]]]:
    """``(command path, subcommands, options)`` for the root and every command."""
    rows = [("", subcommands(parser), options(parser))]
    rows += [(" ".join(p), subcommands(sub), options(sub)) for p, sub, _ in commands(parser)]
    return rows


def bash_completion() -> str:
    lines = [
        "# bash completion for vmreclaim (generated by python -m vmreclaim.cli.manpages)",
        "_vmreclaim() {",
        "    local cur=${COMP_WORDS[COMP_CWORD]} path='' i w subs opts",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        "        w=${COMP_WORDS[i]}",
        "        [[ $w == -* ]] && continue",
        '        case "${path:+$path }$w" in',
    ]
    table = _table(build_parser())
    for path, _, _ in table[1:]:
        lines.append(f"            '{path}') path='{path}' ;;")
    lines += ["        esac", "    done", '    case "$path" in']
    for path, subs, opts in table:
        lines.append(f"        '{path}') subs='{' '.join(subs)}'; opts='{' '.join(opts)}' ;;")
    lines += [
        "    esac",
        '    if [[ $cur == -* ]]; then COMPREPLY=($(compgen -W "$opts" -- "$cur"))',
        '    elif [[ -n $subs ]]; then COMPREPLY=($(compgen -W "$subs" -- "$cur"))',
        '    else COMPREPLY=($(compgen -f -- "$cur")); fi',
        "}",
        "complete -o filenames -F _vmreclaim vmreclaim",
    ]
    return "\n".join(lines) + "\n"


def zsh_completion() -> str:
    lines = [
        "#compdef vmreclaim",
        "# zsh completion for vmreclaim (generated by python -m vmreclaim.cli.manpages)",
        "local path_='' w",
        "local -a subs opts",
        "for w in ${words[2,CURRENT-1]}; do",
        "  [[ $w == -* ]] && continue",
        '  case "${path_:+$path_ }$w" in',
    ]
    table = _table(build_parser())
    for path, _, _ in table[1:]:
        lines.append(f"    '{path}') path_='{path}' ;;")
    lines += ["  esac", "done", 'case "$path_" in']
    for path, subs, opts in table:
        lines.append(f"  '{path}') subs=({' '.join(subs)}); opts=({' '.join(opts)}) ;;")
    lines += [
        "esac",
        "if [[ $PREFIX == -* ]]; then compadd -a opts",
        "elif (( ${#subs} )); then compadd -a subs",
        "else _files; fi",
    ]
    return "\n".join(lines) + "\n"


def generated() -> dict[str, str]:
    """Every generated file, by its path relative to the repository root."""
    files = {f"man/{name}": text for name, text in man_pages().items()}
    files["completion/vmreclaim.bash"] = bash_completion()
    files["completion/_vmreclaim"] = zsh_completion()
    return files


def write(root: Path) -> None:
    for rel, text in generated().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
