"""What every entry point does with errors: a one-line message and an exit code, never a traceback."""
from __future__ import annotations

import asyncio
import sys
from typing import Awaitable, Callable

from common.assets import AssetError
from common.config import ConfigError

EXIT_USAGE, EXIT_CLOUD, EXIT_INTERRUPTED = 2, 3, 130


def run_async(make: Callable[[], Awaitable[int | None]]) -> int:
    """asyncio.run(make()) with bad config/input/models -> 2, cloud unreachable or refusing -> 3."""
    from edge.cloud_client import CloudError, CloudUnavailable
    try:
        return asyncio.run(make()) or 0
    except (ConfigError, AssetError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CloudUnavailable, CloudError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CLOUD
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


async def wait_forever() -> None:
    await asyncio.Event().wait()
