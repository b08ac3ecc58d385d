"""Scoring plumbing: a tqdm bar for `nanoalign.evaluate.evaluate`'s progress callback (the book reports progress
through a plain callable and imports no tqdm)."""

from tqdm import tqdm


def progress_bar(desc="eval"):
    """A progress(done, total, task) callable for `evaluate` drawing one tqdm bar."""
    bar = None

    def progress(done, total, task):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
        bar.set_postfix_str(str(task), refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return progress
