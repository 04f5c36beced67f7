# SBS tasks. `pip install -e '.[dev]'` first (it brings `just` itself, from rust-just).

python := env_var_or_default("PYTHON", "python3")

# list the recipes
default:
    @just --list

# a real pair on 127.0.0.1 and 127.0.0.2: replication, kill -9, takeover, rejoin, promote
demo: bytecode
    {{python}} -m sbs.tools.demo

# the test suite (real nodes on loopback), on two workers: ~5 minutes on 2 cores
test *args: bytecode
    {{python}} -m pytest -q -n 2 {{args}}

# the benchmarks (minutes; figures go to bench/out/)
bench *args:
    {{python}} bench/takeover.py {{args}}
    {{python}} bench/sentinel_takeover.py {{args}}
    {{python}} bench/never_twice.py {{args}}
    {{python}} bench/transport.py {{args}}
    {{python}} bench/replication.py {{args}}

# every run the READMEs cite, on committed code, kept in bench/results/<run ID>/ (60-70 minutes)
bench-cited *args:
    {{python}} bench/run_cited.py {{args}}

# the READMEs' figure tables from one cited run; `--write` puts them into README.md and bench/README.md
bench-tables run *args:
    {{python}} bench/tables.py {{run}} {{args}}

# the node's bytecode, as an installed package has it: an editable install never compiles, and
# with PYTHONDONTWRITEBYTECODE set every node start would compile its ~40 modules again (~0.1 s)
bytecode:
    @{{python}} -m compileall -q node tools > /dev/null

# ruff, as CI would
lint:
    {{python}} -m ruff check .
