"""Split a matrix by image across N runners: `--racker-shard K/N`, `racker nightly --shard K/N`.

Round-robin over the sorted image names: shard K takes the K-th, (K+N)-th …
image. Every image lands in exactly one shard, all the tests of one image
stay together (so each boots once), and the split depends on nothing but the
names and N, so every runner of one CI pipeline, given the same image list,
computes the same slices without talking to the others. Round-robin rather
than a hash of the name: with a handful of images a hash can leave a shard
empty while another takes three.
"""

from __future__ import annotations

from dataclasses import dataclass

from racker.errors import RackerError


class BadShard(RackerError):
    """A --shard that is not K/N with 1 <= K <= N."""


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based, as CI engines number their parallel jobs
    total: int

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"

    def select(self, names: list[str]) -> list[str]:
        """This shard's slice of `names` (in sorted order, whatever order they came in)."""
        return sorted(set(names))[self.index - 1 :: self.total]


def parse(text: str) -> Shard:
    index, slash, total = text.partition("/")
    try:
        shard = Shard(int(index), int(total))
    except ValueError:
        shard = None
    if not slash or shard is None or not 1 <= shard.index <= shard.total:
        raise BadShard(f"bad shard {text!r}: expected K/N with 1 <= K <= N, e.g. 2/4", hint="CI: --shard $CI_NODE_INDEX/$CI_NODE_TOTAL")
    return shard
