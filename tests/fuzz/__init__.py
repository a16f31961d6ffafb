"""Coverage-guided fuzzing harnesses (atheris) for the worker's input paths.

NAME
    tests.fuzz -- fuzz targets for the attribute decoder, the request scanner and a
    whole proxymap connection with real tables behind it

SYNOPSIS
    make fuzz                                   # >= 1 000 000 inputs over the three targets
    .venv/bin/python -m tests.fuzz.run attr -runs=200000
    .venv/bin/python -m tests.fuzz.run connection -max_total_time=60
    .venv/bin/python -m tests.fuzz.run all --runs 1000000

DESCRIPTION
    Each target is a plain function ``one_input(data: bytes) -> None`` that raises on
    a violated property (``targets.attr_one``, ``targets.scanner_one``,
    ``world.World.one_input``). ``run`` drives them with atheris (libFuzzer:
    coverage-guided mutation of the Python bytecode's branches), seeded with valid
    requests of both client generations and a dictionary of the protocol's words;
    ``tests/test_fuzz.py`` replays the seeds and a short atheris budget under pytest.

SEE ALSO
    targets.py, world.py, run.py, seeds.py
"""
