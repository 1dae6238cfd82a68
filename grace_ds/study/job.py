"""One run of a study in its own process: `python -m grace_ds.study.job STUDY_DIR RUN_NAME`.

Started by the parallel scheduler of `launch/study.py --jobs N`; rebuilds the Study from
STUDY_DIR/job_spec.json, trains (or rounds) the named run and scores it (RUN/eval.json).
"""

import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m grace_ds.study.job STUDY_DIR RUN_NAME", file=sys.stderr)
        return 2
    from grace_ds.study.runner import Study

    Study.from_job_spec(argv[0]).run_named(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
