"""The typer application objects; each ``cli`` module registers its commands on them."""

import typer

app = typer.Typer(
    name="lt-distill",
    help="Offline CLIP soft labels for long-tailed detection: precompute a label store once, train from it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
store_app = typer.Typer(help="Inspect and check a label store.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks: print a table and optionally write JSON.", no_args_is_help=True)
app.add_typer(store_app, name="store")
app.add_typer(bench_app, name="bench")
