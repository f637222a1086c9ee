"""The CLIs' one error handler: `prog: Category: message` and an exit status.

`run(prog, body, err)` runs a CLI's body and maps what it raises: 1 for an operational
failure (the gRPC status's category, or the CLI's own `CliError`), 2 for bad arguments or
configuration, 130 on Ctrl-C; a closed pipe (`adoptctl jobs | head`) is silent.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TextIO

import grpc

from node_agent import config as config_mod
from node_agent.errors import AuthError, ImpostorError, StartupError

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 128 + 2

CATEGORIES = {
    grpc.StatusCode.UNAVAILABLE: "Agent unreachable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "Timeout",
    grpc.StatusCode.PERMISSION_DENIED: "Permission denied",
    grpc.StatusCode.UNAUTHENTICATED: "Authentication failed",
    grpc.StatusCode.NOT_FOUND: "Not found",
    grpc.StatusCode.ALREADY_EXISTS: "Already exists",
    grpc.StatusCode.INVALID_ARGUMENT: "Invalid argument",
    grpc.StatusCode.FAILED_PRECONDITION: "Failed",
    grpc.StatusCode.UNIMPLEMENTED: "Not supported",
    # The agent's caps (ssh-to-job sessions), and grpc's own limits (a message too large).
    grpc.StatusCode.RESOURCE_EXHAUSTED: "Limit reached",
}


class UsageError(Exception):
    """Bad arguments: `prog: Usage: message`, exit status 2."""


class CliError(Exception):
    """An operational failure detected by the CLI itself: `prog: category: message`."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category


def run(prog: str, body: Callable[[], int], err: TextIO) -> int:
    """Run a CLI's body with the shared error handling; its exit status."""
    try:
        return body()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Silence the flush at exit too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except (UsageError, config_mod.ConfigError) as e:
        print(f"{prog}: {'Configuration' if isinstance(e, config_mod.ConfigError) else 'Usage'}:"
              f" {e}", file=err)
        return EXIT_USAGE
    except grpc.RpcError as e:
        code = e.code()
        details = e.details() or code.name
        if code == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details.lower():
            details = f"no agent answers ({details})"
        print(f"{prog}: {CATEGORIES.get(code, 'Error')}: {details}", file=err)
        return EXIT_FAILURE
    except CliError as e:
        print(f"{prog}: {e.category}: {e}", file=err)
        return EXIT_FAILURE
    except ImpostorError as e:
        print(f"{prog}: Authentication failed: {e}", file=err)
        return EXIT_FAILURE
    except AuthError as e:
        print(f"{prog}: MUNGE: {e}", file=err)
        return EXIT_FAILURE
    except StartupError as e:
        print(f"{prog}: Cannot start: {e}", file=err)
        return EXIT_FAILURE
    except ValueError as e:
        print(f"{prog}: Invalid argument: {e}", file=err)
        return EXIT_USAGE
