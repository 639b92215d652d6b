"""``transferkit backbones`` and ``transferkit weights``: what can be loaded, and bringing weights offline."""

from __future__ import annotations

import json

import click

from transferkit import runtime
from transferkit.cli.app import handle_errors, main
from transferkit.cli.options import backbone_option, image_size_option

# ----------------------------------------------------------------------------- backbones

@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def backbones(as_json: bool) -> None:
    """List the backbones: input size, feature size, parameters, offline weights."""
    from transferkit.models.registry import list_backbones
    from transferkit.models.weights import BUNDLED_WEIGHTS_DIR, find_offline

    rows = []
    for spec in list_backbones():
        local = find_offline(spec) if spec.pretrained else None
        offline = "bundled" if local and local.parent == BUNDLED_WEIGHTS_DIR else ("cache" if local else "")
        rows.append({
            "name": spec.name, "family": spec.family, "input_size": spec.input_size,
            "feature_dim": spec.feature_dim, "num_params": spec.num_params, "num_blocks": spec.num_blocks,
            "preprocessing": spec.preprocessing, "pretrained": spec.pretrained,
            "weights_offline": offline or None,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = f"{'name':<22} {'input':>5} {'features':>8} {'params':>8} {'blocks':>6}  offline weights"
    click.echo(header)
    click.echo("-" * len(header))
    for row in rows:
        offline = row["weights_offline"] or ("-" if row["pretrained"] else "n/a (test backbone)")
        click.echo(
            f"{row['name']:<22} {row['input_size']:>5} {row['feature_dim']:>8} "
            f"{row['num_params'] / 1e6:>7.1f}M {row['num_blocks']:>6}  {offline}"
        )
    from transferkit.models.weights import keras_models_dir

    click.echo(f"\nOffline weights are looked up in {keras_models_dir()} (KERAS_HOME) and in the package.")


# ----------------------------------------------------------------------------- weights

@main.group()
def weights() -> None:
    """Manage ImageNet weights files in Keras' cache."""


@weights.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@backbone_option(default=None)
@image_size_option
@handle_errors
def weights_import(file: str, backbone: str, image_size: int | None) -> None:
    """Verify FILE by loading it into a backbone, then place it in Keras' cache.

    Use it to bring weights downloaded on another machine to an offline one.
    """
    from transferkit.models.registry import get_backbone
    from transferkit.models.weights import import_weights

    spec = get_backbone(backbone)
    runtime.start_tensorflow()
    target = import_weights(file, spec, image_size)
    click.echo(f"Verified {file} for {spec.name}; placed at {target}.")
