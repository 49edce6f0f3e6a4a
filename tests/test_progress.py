"""The progress line of sampling and scoring: items done, rate and time left, on a fake
clock; redrawn in place on a terminal, a few whole lines into a file."""
import io

from ipu_diffusion.progress import Progress, format_seconds


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_rate_and_time_left_leave_out_the_first_batch():
    clock, out = Clock(), io.StringIO()
    bar = Progress(1000, "sampling", stream=out, every=0.0, clock=clock)
    clock.now += 30.0  # the first batch: compilation + 250 images
    bar.add(250)
    assert bar.line() == "sampling  250/1,000 images  8.33 images/s  ETA 1 min 30 s"
    clock.now += 5.0  # 250 more in 5 s: 50 images/s from here on, 500 left = 10 s
    bar.add(250)
    assert bar.line() == "sampling  500/1,000 images  50 images/s  ETA 10 s"
    clock.now += 10.0
    bar.add(500)
    # the last line: the overall rate, compilation included
    assert out.getvalue().splitlines()[-1] == "sampling  1,000/1,000 images  22.2 images/s  took 45 s"


def _run(total, seconds_each, every):
    """A file-bound bar over ``total`` items of ``seconds_each``: what it wrote."""
    clock, out = Clock(), io.StringIO()
    bar = Progress(total, "features", stream=out, every=every, clock=clock)
    for _ in range(total):
        clock.now += seconds_each
        bar.add(1)
    return out.getvalue()


def test_a_file_gets_a_line_every_few_seconds_and_the_last():
    written = _run(10, 3.0, every=10.0)
    lines = written.splitlines()
    # t = 3 (first), 15 (>= 10 s later), 27, then the end at 30
    assert [line.split("  ")[1] for line in lines] == ["1/10 images", "5/10 images",
                                                      "9/10 images", "10/10 images"]
    assert "\r" not in written


def test_a_terminal_line_is_redrawn_and_cleared():
    clock, out = Clock(), Terminal()
    bar = Progress(2, "bits/dim", stream=out, clock=clock)
    clock.now += 100.0
    bar.add(1)
    clock.now += 1.0
    bar.add(1)
    first, second = out.getvalue().split("\r")[1:]
    assert first == "bits/dim  1/2 images  0.01 images/s  ETA 1 min 40 s"
    assert second.rstrip("\n").rstrip() == "bits/dim  2/2 images  0.0198 images/s  took 1 min 41 s"
    assert len(second.rstrip("\n")) >= len(first) and second.endswith("\n")


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3599, 3600 * 2 + 61)] == \
        ["0 s", "59 s", "1 min 01 s", "59 min 59 s", "2 h 01 min"]


def test_quick_work_says_nothing():
    assert _run(3, 0.5, every=0.0) == ""
