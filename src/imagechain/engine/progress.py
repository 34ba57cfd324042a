"""How the engine reports progress without knowing who watches (a rich bar, JSON, nothing)."""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, label: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...

    def stop(self) -> None: ...

    def notice(self, message: str) -> None: ...


class Silent:
    def __init__(self) -> None:
        self.notices: list[str] = []

    def start(self, label: str, total: int) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def stop(self) -> None:
        pass

    def notice(self, message: str) -> None:
        self.notices.append(message)
