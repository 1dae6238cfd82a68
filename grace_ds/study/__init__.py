"""The comparison study of issue 6 (`python launch/study.py`): presets, runner, tables.

presets.py  cpu-smoke / gpu sizes        runner.py  data -> teacher -> students -> evaluation
rtn.py      post-training RTN export     report.py  Table 2 / Table 4 analogues + ordering checks
"""
