"""A server of several workers is measured only once every worker listens: health answers from
whichever worker a connection reaches, so SERVING alone can come from the first worker while
the second is still starting (and would get none of the load's connections).

A real supervisor spawning two real gRPC processes on one port (SO_REUSEPORT), the second
starting seconds after the first.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from policy_engine.bench import procs
from policy_engine.bench.server import SERVER_KINDS, ServerOptions, ServerSpec, running
from policy_engine.server import balance

STAGGERED = textwrap.dedent(
    """
    import multiprocessing, os, signal, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor

    def orphaned(parent):
        # A worker outlives no parent (the harness SIGTERMs the parent, then SIGKILLs).
        while os.getppid() == parent:
            time.sleep(0.1)
        os._exit(0)

    def serve(address, delay, parent):
        threading.Thread(target=orphaned, args=(parent,), daemon=True).start()
        time.sleep(delay)
        import grpc
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        server = grpc.server(ThreadPoolExecutor(2), options=[("grpc.so_reuseport", 1)])
        servicer = health.HealthServicer()
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port(address)
        server.start()
        server.wait_for_termination()

    if __name__ == "__main__":
        ctx = multiprocessing.get_context("spawn")
        workers = [
            ctx.Process(target=serve, args=(sys.argv[1], delay, os.getpid())) for delay in (0, 3)
        ]
        for worker in workers:
            worker.start()

        def stop(signum, frame):
            for worker in workers:
                worker.terminate()
            sys.exit(0)

        signal.signal(signal.SIGTERM, stop)
        for worker in workers:
            worker.join()
    """
)


def test_a_server_of_two_workers_is_ready_when_both_listen(tmp_path: Path) -> None:
    script = tmp_path / "staggered.py"
    script.write_text(STAGGERED)
    SERVER_KINDS["staggered"] = lambda address, options: [sys.executable, str(script), address]
    try:
        spec = ServerSpec("staggered", workers=2)
        options = ServerOptions(1, None, tmp_path)
        with running(spec, options, tmp_path / "server.log", cwd=tmp_path) as server:
            port = int(server.target.rpartition(":")[2])
            workers = procs.workers(server.process.pid)
            assert len(workers) == 2
            assert balance.listening(port, workers) == dict.fromkeys(workers, True)
    finally:
        del SERVER_KINDS["staggered"]
