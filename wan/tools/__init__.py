"""The command lines, one module each, all of one shape (the top floor: nothing below imports
them):

    module          command                    script           what
    serve.py        python -m wan.serve        wan-serve        several players per device
    compare.py      python -m wan.compare      wan-compare      a precision's accuracy
    integrate.py    python -m wan.integrate    wan-integrate    into a checkout and back
    kernels.py      python -m wan.kernels      wan-kernels      each op's backends here
    play.py         python -m wan.play         wan-play         the browser game server
    play_client.py  python -m wan.play.client  wan-play-client  scripted players

Each has `PROG`, a `cli.ArgumentParser` (every argument with a help text) and
`main(argv=None)` = `cli.run(PROG, _main, argv)` (cli.py: one-line errors, exit status 2, the
checks before work). `python -m wan.<command>` is a two-line launcher (wan/serve.py,
wan/kernels/__main__.py, wan/play/__main__.py, ...) and the script is pyproject.toml's
[project.scripts] entry `wan.tools.<module>:main`: both call that `main`."""
