"""The ``distill`` command. Each part of the system contributes its own click group."""

from __future__ import annotations

import logging

import click

from distill_reader import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="distill")
@click.option("-v", "--verbose", count=True, help="More logging (-v: INFO, -vv: DEBUG).")
def main(verbose: int) -> None:
    """Service-based knowledge distillation: teachers as inference services, students stream to them."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _register_commands() -> None:
    from distill_reader.bench.commands import bench
    from distill_reader.demo.command import demo
    from distill_reader.discovery.commands import discovery, register
    from distill_reader.knowledge.commands import store
    from distill_reader.serving.commands import teacher

    teacher.add_command(register, "register")
    for command in (demo, teacher, discovery, bench, store):
        main.add_command(command)


_register_commands()
