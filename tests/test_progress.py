"""colax.progress: a line every `every` seconds and a last one, with counts, rates, % and ETA."""

from colax import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_line_every_interval_then_the_last_one():
    clock, lines = Clock(), []
    counter = progress.Progress("job", lines.append, total=100, every=10, clock=clock)
    clock.now = 4
    counter.add(documents=20, tokens=2000)
    assert lines == []  # within the interval
    clock.now = 10
    counter.add(documents=5, tokens=500)
    assert lines == ["job: 25 documents (2/s), 2,500 tokens (250/s), 25.0%, ETA 00:00:30"]
    clock.now = 15
    counter.add(documents=5)
    assert len(lines) == 1  # 5 s since the last line
    clock.now = 40
    counter.done("7 rows", documents=70)
    assert lines[-1] == "job: 100 documents (2/s), 2,500 tokens (62/s), 7 rows, done in 40.0 s"


def test_unknown_total_has_no_eta():
    clock, lines = Clock(), []
    counter = progress.Progress("job", lines.append, every=1, clock=clock)
    clock.now = 2
    counter.add(files=3)
    assert lines == ["job: 3 files (2/s)"]
