"""The context-manager half of test helpers that own a process: `start()`
in `with`, `close()` after, and a start that fails half-way closed too, so a
test that fails to start a daemon or a guest leaves nothing running."""

from __future__ import annotations

from typing import Any


class Started:
    """Mixin: the class gives start() (returning self) and close()."""

    def start(self) -> Any:  # pragma: no cover - the class gives it
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - the class gives it
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
