"""Progress lines of a long job (packing, prepare, tokenizer training, evaluation): one every `every`
seconds while it runs and a last one when it ends, each with its counts, their rates and, where the
total is known, the percentage and ETA:

  prepare: 12,034 documents (1,203/s), 9,912,220 tokens (991,222/s), 40.1%, ETA 00:00:15
  prepare: 30,000 documents (1,250/s), 24,700,000 tokens (1,029,166/s), done in 24.0 s
"""

import time

EVERY = 10.0  # seconds between lines


class Progress:
    """`say(line)` for the job `name`; `add(**counts)` as it goes (the first count is the one `total`
    counts, None: unknown), `done(note)` at its end (the last line, with `note` after the counts)."""

    def __init__(self, name: str, say=print, total: int | None = None, every: float = EVERY, clock=time.monotonic):
        self.name, self.say, self.total, self.every, self.clock = name, say, total, every, clock
        self.counts: dict[str, int] = {}
        self.start = self.last = clock()

    def add(self, **counts: int) -> None:
        """Adds `counts` ({unit: how many more}); says a line if `every` seconds have passed since the last."""
        for unit, n in counts.items():
            self.counts[unit] = self.counts.get(unit, 0) + n
        if self.clock() - self.last >= self.every:
            self.say(self.line())

    def line(self, final: bool = False, note: str = "") -> str:
        """The progress line now; `final`: the last one (no ETA, the time taken)."""
        self.last = self.clock()
        secs = max(self.last - self.start, 1e-9)
        parts = [f"{n:,} {unit} ({n / secs:,.0f}/s)" for unit, n in self.counts.items()]
        if self.total and self.counts and not final:
            done = next(iter(self.counts.values()))
            left = (self.total - done) / max(done / secs, 1e-9)
            parts.append(f"{100 * done / self.total:.1f}%, ETA {time.strftime('%H:%M:%S', time.gmtime(left))}")
        parts += [note] if note else []
        return f"{self.name}: " + ", ".join(parts + ([f"done in {secs:.1f} s"] if final else []))

    def done(self, note: str = "", **counts: int) -> None:
        """The last line, after adding `counts` (a job that knows its counts only at its end)."""
        for unit, n in counts.items():
            self.counts[unit] = self.counts.get(unit, 0) + n
        self.say(self.line(final=True, note=note))
