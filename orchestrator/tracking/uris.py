"""Where the tracking store is: the sweep's URI (a local SQLite store by default), checked before
anything starts."""

from __future__ import annotations

import json
import os

from methods.config import ConfigError


def tracking_uri(spec) -> str:
    """spec.tracking.uri, else `sqlite:///<abs storage>/mlflow.db` (absolute: Tune changes cwd)."""
    if spec.tracking.uri:
        return normalize_uri(spec.tracking.uri)
    storage = spec.storage if "://" not in spec.storage else "."
    return f"sqlite:///{os.path.abspath(os.path.expanduser(storage))}/mlflow.db"


def experiment_name(spec) -> str:
    return spec.tracking.experiment or spec.name


def normalize_uri(uri: str) -> str:
    """sqlite:///rel.db, a *.db file or a folder (its mlflow.db) -> sqlite:////abs; servers unchanged."""
    if uri.startswith("sqlite:///"):
        uri = uri[len("sqlite:///"):]
    elif "://" in uri or uri.startswith("databricks"):
        return uri.rstrip("/")
    path = os.path.abspath(os.path.expanduser(uri))
    return f"sqlite:///{path if path.endswith('.db') and not os.path.isdir(path) else os.path.join(path, 'mlflow.db')}"


def check_tracking_uri(uri: str, timeout_s: float = 5.0) -> None:
    """Fail before the sweep, in a few seconds, when the tracking store cannot be used."""
    import urllib.error
    import urllib.request

    if uri.startswith(("http://", "https://")):
        url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                json.load(r)
        except urllib.error.HTTPError as e:
            if e.code not in (401, 403):  # a server that wants credentials does answer
                raise ConfigError(f"tracking.uri={uri}: not an MLflow server (HTTP {e.code} from {url})") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise ConfigError(f"tracking.uri={uri}: no MLflow server answers there ({reason}); start one "
                              f"(`orchestrate ui`), fix the address, or leave tracking.uri empty for a local "
                              f"SQLite store") from None
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"tracking.uri={uri}: cannot create {folder} ({e.strerror})") from None
    elif uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        raise ConfigError(f"tracking.uri={uri}: MLflow's file store is legacy; use sqlite:///ABS/PATH.db or http://host:port")
