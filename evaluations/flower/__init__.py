"""The Flower engine (``engine: flower``), on one floor (DESIGN §9):

* :mod:`~evaluations.flower.trainer` — the run's clients behind Flower messages (:class:`FlowerClients`,
  over a :class:`GridTransport`), held by the in-process round loop (:func:`flower_trainer`);
* :mod:`~evaluations.flower.node` — a node's side: its records and what it runs for one message
  (:class:`ClientRuntime`, around the in-process clients of the client it serves);
* :mod:`~evaluations.flower.app` — the ServerApp and ClientApp, the Flower App a run submits, the
  simulation and deployment launchers, and the driver's merge of the clients' metrics files;
* :mod:`~evaluations.flower.local` — SuperLink / SuperNode processes on 127.0.0.1 and the CLI
  connection file;
* :mod:`~evaluations.flower.worker` — the long-running per-node worker a short-lived ClientApp forwards to;
* :mod:`~evaluations.flower.certs` — a CA and server certificate for TLS (``pfedpg-eval flower-certs``).

Only this package imports ``flwr``; the in-process runner (``pfedpg/``) does not know it exists.
"""
