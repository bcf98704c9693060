"""Scraping a metrics endpoint over real HTTP, for the metrics tests (runtime, executor, end to end)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families


class Samples(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    """(name, labels) → value, and the names of the metric families described (a labelled metric nobody used
    yet, such as the errors of a service without errors, has a `# TYPE` line and no samples)."""

    families: set[str]

    def __init__(self) -> None:
        super().__init__()
        self.families = set()


def scrape(url: str) -> Samples:
    """Every sample the endpoint at `url` serves now: (name, labels) → value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = Samples()
    for family in text_string_to_metric_families(text):
        samples.families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def ascrape(url: str) -> Samples:
    return await asyncio.to_thread(scrape, url)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(value for (sample, have), value in samples.items() if sample == name and wanted <= have)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(have)[label] for (sample, have), _ in samples.items() if sample == name and label in dict(have)}


def exposes(samples: Samples, metric: str) -> bool:
    """Whether `metric` (a METRIC_NAMES entry: a counter with `_total`, a histogram by its base name) is there."""
    present = names(samples) | getattr(samples, "families", set())
    return metric in present or metric.removesuffix("_total") in present or f"{metric}_count" in present


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def only(mapping: Mapping[str, str], *keys: str) -> dict[str, str]:
    return {k: mapping[k] for k in keys}
