"""``transferkit cache``: inspect, verify, prune and merge the feature cache."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from transferkit import runtime
from transferkit.cli.app import handle_errors, main
from transferkit.cli.options import cache_dir_option

log = logging.getLogger("transferkit")


# ----------------------------------------------------------------------------- cache

@main.group()
def cache() -> None:
    """Inspect and maintain the feature cache (the folder of extract --cache-dir and train --cache-dir)."""


def _cache_root(cache_dir: str | None) -> Path:
    from transferkit.cache import default_cache_dir

    return Path(cache_dir) if cache_dir else default_cache_dir()


@cache.command("info")
@cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def cache_info(cache_dir, as_json) -> None:
    """Entries, size and settings of each backbone's features, and the last run's hit rate."""
    from transferkit.cache import cache_summary

    root = _cache_root(cache_dir)
    rows = cache_summary(root)
    if as_json:
        click.echo(json.dumps({"cache_dir": str(root), "specs": rows}, indent=2))
        return
    click.echo(f"Cache: {root}")
    if not rows:
        click.echo("  (empty)")
    for row in rows:
        spec, last = row["spec"], row["last_run"]
        hit = (f"; last run {last['date']}: {last['images']} images, hit rate {last['hit_rate']:.0%}"
               if last else "")
        view = f" augmented view {spec['view']}" if spec.get("view") else ""
        click.echo(
            f"  {spec['backbone']} {spec['image_size']}px {spec['dtype']}{view}: {row['entries']} vectors in "
            f"{row['shards']} shards, {row['bytes'] / 1e6:.1f} MB{hit}  [{row['folder']}]"
        )
    click.echo(f"Total: {sum(r['entries'] for r in rows)} vectors, {sum(r['bytes'] for r in rows) / 1e6:.1f} MB")


@cache.command("verify")
@cache_dir_option
@click.option("--deep", is_flag=True,
              help="Also recompute a sample of vectors from their images and compare them with the cached ones.")
@click.option("--sample", type=click.IntRange(min=1), default=None,
              help="With --deep: vectors recomputed per backbone setting.  [default: 100]")
@click.option("--weights", default=None,
              help="With --deep: the weights the vectors were built with (imagenet, none, or a file). "
                   "Default: whichever of imagenet and none matches the cache's weights fingerprint.")
@click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
              help="With --deep and --weights none: the seed the weights were built with (the sample of "
                   "vectors is drawn with a fixed seed of its own, so every run checks the same vectors).")
@handle_errors
def cache_verify(cache_dir, deep, sample, weights, seed) -> None:
    """Re-read every shard against its checksums; exit 1 if any is damaged.

    Damaged shards are never read as numbers: the next extraction sets them aside and
    computes their vectors again (or run 'transferkit cache prune' to drop them now).
    With --deep, also recompute a sample of vectors from their images (found
    through the cache's file-hash index, used only while they still have the same
    bytes) and exit 1 if any cached vector differs, or if nothing could be verified.
    """
    from transferkit.cache import verify_cache

    if not deep and (sample is not None or weights is not None):
        raise click.UsageError("--sample and --weights go with --deep.")
    root = _cache_root(cache_dir)
    checked, damaged = verify_cache(root)
    for shard, reason in damaged:
        click.echo(click.style("Damaged: ", fg="red") + f"{shard}: {reason}")
    click.echo(f"Checked {checked} shards in {root}: {len(damaged)} damaged.")
    mismatches, unverified = [], False
    if deep:
        from transferkit.cache import verify_vectors

        runtime.start_tensorflow()
        report = verify_vectors(root, sample=sample or 100, weights=weights, seed=seed)
        mismatches = report["mismatches"]
        for spec_dir, reason in report["not_checked"]:
            log.warning("Not checked: %s: %s", spec_dir, reason)
        for path, spec_dir, detail in mismatches:
            click.echo(click.style("Mismatch: ", fg="red") + f"{path}: {spec_dir.name}: {detail}")
        gone = f"; {report['no_source']} vectors have no unchanged image left" if report["no_source"] else ""
        click.echo(f"Recomputed {report['checked']} sampled vectors from their images: {len(mismatches)} "
                   f"differ{gone}.")
        if mismatches:
            click.echo("Delete the folders named above (transferkit recomputes their vectors on the next run).")
        unverified = report["checked"] == 0 and bool(report["vectors"] or report["not_checked"])
        if unverified:  # 0 of 0 differ is not a pass
            click.echo(click.style("Not verified: ", fg="red") + "nothing could be verified: no cached vector could "
                       "be recomputed (see 'Not checked' above, and the vectors whose image is gone or changed). "
                       "Pass --weights (and --seed for none) as the vectors were built, where their images are.")
    if damaged or mismatches or unverified:
        sys.exit(1)


@cache.command("prune")
@cache_dir_option
@click.option("--missing", is_flag=True, help="Drop vectors of images that are gone (or changed) from their paths.")
@click.option("--older-than", type=click.DateTime(), default=None,
              help="Drop vectors written before this date (e.g. 2026-01-31).")
@handle_errors
def cache_prune(cache_dir, missing, older_than) -> None:
    """Drop entries, drop damaged shards, and compact each backbone's vectors into one shard."""
    from transferkit.cache import prune_cache

    root = _cache_root(cache_dir)
    report = prune_cache(root, missing=missing, older_than=older_than.timestamp() if older_than else None)
    click.echo(
        f"{root}: {report['entries_before']} -> {report['entries_after']} vectors, "
        f"{report['shards_before']} -> {report['shards_after']} shards."
    )


@cache.command("merge")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@cache_dir_option
@handle_errors
def cache_merge(sources, cache_dir) -> None:
    """Copy the shards of other caches (e.g. one per worker of extract --num-shards) into this one."""
    from transferkit.cache import merge_caches

    root = _cache_root(cache_dir)
    report = merge_caches(root, sources)
    for shard, reason in report["damaged"]:
        log.warning("Not copied, damaged: %s: %s", shard, reason)
    click.echo(f"Merged into {root}: {report['copied']} shards copied, {report['already_present']} already "
               f"present, {len(report['damaged'])} damaged.")
    if report["damaged"]:
        sys.exit(1)
