"""Progress of a stage's denoising steps as plain log lines.

tqdm bars redraw one terminal line with carriage returns; in a prediction's logs (Replicate's web
page, `cog predict`, webhooks) they arrive as noise or not at all. StepLog prints ordinary lines
instead, often enough to show that a long stage is moving, rarely enough to stay readable:

    keyframes: step 8/75 (11%), 2.4 s elapsed, about 20.1 s left
"""

import math
import time


class StepLog:
    """A callable that wraps a stage's steps, like tqdm: `for t in StepLog("keyframes")(timesteps)`.

    A line is printed after every `fraction` of the steps (at least every 10%) and whenever
    `interval` seconds have passed since the last line, whichever comes first, and after the
    last step. A stage that runs its steps loop several times (sr1 denoises its video window by
    window) is called once per loop; with `passes` set, each loop's lines name it: "window 2/4".
    """

    def __init__(self, name, passes=1, pass_name="pass", fraction=0.1, interval=5.0, clock=time.monotonic, write=print):
        self.name = name
        self.passes = passes
        self.pass_name = pass_name
        self.fraction = fraction
        self.interval = interval
        self.clock = clock
        self.write = write
        self.passes_started = 0

    def __call__(self, steps):
        self.passes_started += 1
        return self._logged(steps, self._label())

    def _label(self):
        if self.passes == 1:
            return self.name
        return f"{self.name} {self.pass_name} {self.passes_started}/{self.passes}"

    def _logged(self, steps, label):
        total = len(steps)
        steps_between_lines = max(1, math.ceil(total * self.fraction))
        start = last_line = self.clock()
        for done, step in enumerate(steps, start=1):
            yield step  # the caller runs the step before asking for the next one
            now = self.clock()
            if done % steps_between_lines == 0 or done == total or now - last_line >= self.interval:
                self.write(progress_line(label, done, total, now - start))
                last_line = now


def progress_line(label, done, total, elapsed):
    """'label: step done/total (P%), E s elapsed, about R s left', R extrapolated from the mean step."""
    remaining = elapsed / done * (total - done)
    return (
        f"{label}: step {done}/{total} ({100 * done // total}%), "
        f"{elapsed:.1f} s elapsed, about {remaining:.1f} s left"
    )
