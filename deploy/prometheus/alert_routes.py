"""Alertmanager's configuration for each alert profile: the route, the receiver and the inhibit
rule, rendered by ``render_rules.py`` next to the rules they route.

- ``prod`` (``deploy/alertmanager/alertmanager.yml``, the compose stack's): warnings wait 30 s
  for their group, critical alerts 10 s.
- ``fast`` (``deploy/alertmanager/alertmanager-fast.yml``, for end-to-end tests against the
  fast rules): 1 s. The fast rotation alert fires for only ~4 s (docs/deploy.md), and
  Alertmanager sends nothing for a group whose alerts resolved before its ``group_wait`` ended:
  under the prod timings the fast profile's spike fired in Prometheus and never paged.

The inhibit rule names every health alert of :func:`alert_rules.rules`, so a new alert is
silenced with the rest while its sidecar is down.
"""

from __future__ import annotations

from dataclasses import dataclass

from alert_rules import Profile, dur, rules

#: The receiver of every notification. Nothing listens there by default: the notification is
#: logged as failed and the alert stays visible in the Alertmanager UI and in Grafana. Replace
#: it with your own (Slack, PagerDuty, email:
#: https://prometheus.io/docs/alerting/latest/configuration/) here and re-render, or in the
#: rendered file of your deployment.
RECEIVER_URL = "http://127.0.0.1:5001/orthoshard-alerts"
RECEIVER = "orthoshard-team"
DOWN = "OptimizerSidecarDown"


@dataclass(frozen=True)
class Routing:
    """Alertmanager's waits, in seconds."""

    group_wait: int  # before a new group's first notification
    group_interval: int  # before a changed group's next one
    repeat_interval: int  # before an unchanged firing group's reminder
    critical_wait: int  # group_wait of severity=critical (a sidecar down)
    critical_repeat: int

    def __post_init__(self) -> None:
        assert 0 < self.critical_wait <= self.group_wait <= self.group_interval


ROUTING = {
    "prod": Routing(30, 300, 4 * 3600, 10, 3600),
    "fast": Routing(1, 5, 4 * 3600, 1, 3600),
}


def config_name(p: Profile) -> str:
    return "alertmanager.yml" if p.name == "prod" else f"alertmanager-{p.name}.yml"


def rotation_firing_s(p: Profile) -> int:
    """The shortest time a one-step rotation spike's alert fires, as the rules are written: the
    sidecar holds the turn ``rot_hold`` seconds and the jump window keeps it ``rot_window`` more;
    the alert waits its ``for`` and up to two intervals (the scrape, an evaluation) of that:
    3 s for the fast profile, where ``--rotation-hold 2`` measured 4 s (docs/deploy.md)."""
    return p.rot_hold + p.rot_window - p.rot_for - 2 * p.interval


def alertmanager_doc(p: Profile) -> dict:
    r = ROUTING[p.name]
    health = sorted(rule["alert"] for rule in rules(p) if rule.get("alert", DOWN) != DOWN)
    return {
        "route": {
            "receiver": RECEIVER,
            "group_by": ["alertname", "node"],
            "group_wait": dur(r.group_wait),
            "group_interval": dur(r.group_interval),
            "repeat_interval": dur(r.repeat_interval),
            "routes": [{
                "receiver": RECEIVER,
                "matchers": ['severity = "critical"'],
                "group_wait": dur(r.critical_wait),
                "repeat_interval": dur(r.critical_repeat),
            }],
        },
        "receivers": [{
            "name": RECEIVER,
            "webhook_configs": [{"url": RECEIVER_URL, "send_resolved": True}],
        }],
        # A sidecar that cannot be scraped says nothing about the optimizer: while it is down,
        # silence the health alerts that come from that same sidecar (same scrape target = same
        # instance).
        "inhibit_rules": [{
            "source_matchers": [f'alertname = "{DOWN}"'],
            "target_matchers": [f'alertname =~ "{"|".join(health)}"'],
            "equal": ["instance"],
        }],
    }
