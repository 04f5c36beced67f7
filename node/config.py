"""sbs.ini -> one frozen Config. Every error names the file, section and key."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class EmailConfig:
    enabled: bool = False
    smtp_server: str = "127.0.0.1"
    smtp_port: int = 25
    sender: str = "sbs@example.com"
    receiver: str = "ops@example.com"
    secure: bool = False
    user: str = ""
    password: str = ""
    urls: tuple[str, ...] = field(default_factory=tuple)
