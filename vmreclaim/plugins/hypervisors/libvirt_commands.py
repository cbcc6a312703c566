"""``vmreclaim libvirt enable``: the libvirt driver's own subcommand.

Registered in the entry-point group ``vmreclaim.hooks`` so the command line learns of it
through ``vmreclaim_cli_add_commands`` instead of importing the driver. This module is
loaded with every hook plugin, so it imports the driver (and libvirt-python) only when
the command runs.
"""

from __future__ import annotations

import argparse

from vmreclaim import hookimpl
from vmreclaim.core.commands import CommandOutput, set_command

#: The virtio-serial port name the agent looks for (the driver's ``CHANNEL_NAME``).
DEFAULT_CHANNEL = "org.vmreclaim.0"


@hookimpl
def vmreclaim_cli_add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    libvirt = commands.add_parser("libvirt", help="libvirt domains").add_subparsers(
        dest="libvirt_command", metavar="SUBCOMMAND", required=True
    )
    p = libvirt.add_parser("enable", help="add the vmreclaim channel to a domain's persistent definition")
    p.add_argument("domain", metavar="DOMAIN", help="domain name or UUID")
    p.add_argument("--uri", default="qemu:///system", help="libvirt connection URI (default: qemu:///system)")
    p.add_argument("--name", default=DEFAULT_CHANNEL, help="virtio-serial port name")
    p.add_argument("--path", default=None, help="host socket path (default: chosen by libvirt)")
    p.add_argument("--dry-run", action="store_true", help="print the change, do not make it")
    p.add_argument("--json", action="store_true")
    set_command(p, enable)


def enable(args: argparse.Namespace) -> CommandOutput:
    """Add the channel (or say it is there) and describe the change."""
    from vmreclaim.plugins.hypervisors.libvirt import enable_channel

    change = enable_channel(args.uri, args.domain, name=args.name, path=args.path, dry_run=args.dry_run)
    doc = {
        "domain": change.domain,
        "changed": change.changed,
        "applied": change.applied,
        "channel": change.channel_xml,
        "diff": change.diff,
    }
    if not change.changed:
        return CommandOutput(
            doc, f"{change.domain}: already has the {args.name} channel; nothing to change\n"
        )
    if change.applied:
        tail = f"{change.domain}: channel {args.name} added to the persistent definition (from next start)\n"
    else:
        tail = f"{change.domain}: dry run, nothing changed\n"
    return CommandOutput(doc, change.diff + tail)
