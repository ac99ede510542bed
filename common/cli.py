"""What every entry point does with errors and help: a one-line message and an exit code, never a
traceback; each default printed once in --help."""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Awaitable, Callable, TypeVar

from common.assets import AssetError
from common.config import ConfigError
from common.errors import CloudError, CloudUnavailable

EXIT_USAGE, EXIT_CLOUD, EXIT_INTERRUPTED = 2, 3, 130
T = TypeVar("T")


def report_errors(run: Callable[[], int | None]) -> int:
    """run() with bad config/input/models -> 2, cloud unreachable or refusing -> 3, Ctrl-C -> 130."""
    try:
        return run() or 0
    except (ConfigError, AssetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CloudUnavailable, CloudError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CLOUD
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def run_async(make: Callable[[], Awaitable[int | None]]) -> int:
    """asyncio.run(make()) with report_errors' exit codes."""
    return report_errors(lambda: asyncio.run(make()))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends '(default: X)' to an option's help once, and only where it says something: not when the
    help text already names its default, and not for None, False or an empty list."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text or not action.option_strings or default is None or default is False
                or default == [] or default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


async def wait_forever() -> None:
    await asyncio.Event().wait()
