"""The HTTP service behind `metalab-serve`: adapt a checkpoint to a client's classes, keep the
adapted task, predict with it (docs/serving.md).

Layers, each importing only the ones before it: `state` (an adapted state as named tensors and
back), `store` (adapted tasks in memory and on disk), `images` (client bytes to model input, with
the request limits), `service` (the learner behind the requests, no HTTP), `app` (the HTTP
routes, errors and API key). `metalab.serve` reads the command line and runs the server; nothing
in metalab imports this package.
"""
