"""Play Matrix-Game-2 in a browser: `python -m wan.play` (a game server for several players).

`engine` (the model, decoder, players and the GPU worker), `server` (the Starlette routes, the
page's protocol), `actions` (keys and mouse to the model's action conditions per game mode),
`conditioning` (a start image to the image conditions), `encode` (JPEG), `metrics` (Prometheus).
It imports the runner and the scheduler (`wan.serving.runner`, `wan.serving.scheduler`), never the other way.
"""
