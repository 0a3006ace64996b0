"""Notifications through Prefect automations, to a Webhook block named in the config.

``d2a deploy`` / ``d2a server`` create two automations per config (replacing earlier ones of the same
name), each calling the block named by ``notifications.webhook_block``:

  d2a-<run_name>-failures     a flow run of one of this config's deployments entered a state in
                              ``notifications.on_states`` (Failed, Crashed, Cancelled, TimedOut)
  d2a-<run_name>-promotions   an adapter was promoted to current: the promotion step emits the
                              event ``d2a.adapter.promoted`` (resource ``d2a.adapter.<run_id>``)

The webhook's URL (a Slack/Teams/any incoming-webhook URL is a secret) lives in the block, stored by
the Prefect server, never in a config file or a log:

    python -c "from prefect.blocks.webhook import Webhook; Webhook(url='https://hooks...').save('d2a-alerts')"

The server's automation service evaluates the triggers and posts the JSON payloads below.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.core.config import PipelineConfig

log = logging.getLogger("flows.notify")
PROMOTED_EVENT = "d2a.adapter.promoted"

FAILURE_PAYLOAD = """{"text": "data-to-adapter: flow run {{ flow_run.name }} of {{ deployment.name }} is {{ flow_run.state.name }}",
 "kind": "flow-run-state", "config": "%(run_name)s", "state": "{{ flow_run.state.name }}",
 "flow_run": "{{ flow_run.name }}", "flow_run_id": "{{ flow_run.id }}", "deployment": "{{ deployment.name }}",
 "flow": "{{ flow.name }}", "message": {{ (flow_run.state.message or "") | tojson }}}"""

PROMOTION_PAYLOAD = """{"text": "data-to-adapter: adapter {{ event.resource.name }} promoted to current ({{ event.resource['d2a.config'] }})",
 "kind": "promotion", "config": "{{ event.resource['d2a.config'] }}", "run_id": "{{ event.resource.name }}",
 "reasons": {{ event.payload.reasons | tojson }}}"""


def automation_names(cfg: PipelineConfig) -> tuple[str, str]:
    return f"d2a-{cfg.run_name}-failures", f"d2a-{cfg.run_name}-promotions"


def ensure_automations(cfg: PipelineConfig, deployment_ids: list[Any]) -> list[str]:
    """(Re)create this config's automations; returns their names (none without a webhook block)."""
    from prefect.automations import Automation, CallWebhook, EventTrigger, Posture
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client

    nc = cfg.notifications
    names = automation_names(cfg)
    with get_client(sync_client=True) as c:  # a re-deploy replaces the old automations
        for name in names:
            for a in c.read_automations_by_name(name):
                c.delete_automation(a.id)
    if not nc.webhook_block:
        return []
    try:
        block = Webhook.load(nc.webhook_block)
    except ValueError as e:
        raise ValueError(f"notifications.webhook_block: no Webhook block named {nc.webhook_block!r} on this Prefect "
                         f"server; create it first (see flows/notify.py): {e}") from None
    block_id = block._block_document_id
    created = []
    if nc.on_states and deployment_ids:
        Automation(
            name=names[0], description=f"Post to webhook block {nc.webhook_block} when a {cfg.run_name} run ends "
                                       f"{'/'.join(nc.on_states)}",
            trigger=EventTrigger(
                expect={f"prefect.flow-run.{s}" for s in nc.on_states},
                match={"prefect.resource.id": "prefect.flow-run.*"},
                match_related={"prefect.resource.role": "deployment",
                               "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids]},
                posture=Posture.Reactive, threshold=1, within=0),
            actions=[CallWebhook(block_document_id=block_id, payload=FAILURE_PAYLOAD % {"run_name": cfg.run_name})],
        ).create()
        created.append(names[0])
    if nc.announce_promotions:
        Automation(
            name=names[1], description=f"Post to webhook block {nc.webhook_block} when a {cfg.run_name} adapter "
                                       "is promoted",
            trigger=EventTrigger(expect={PROMOTED_EVENT}, match={"d2a.config": cfg.run_name},
                                 posture=Posture.Reactive, threshold=1, within=0),
            actions=[CallWebhook(block_document_id=block_id, payload=PROMOTION_PAYLOAD)],
        ).create()
        created.append(names[1])
    return created


def announce_promotion(cfg: PipelineConfig, p: dict[str, Any]) -> None:
    """Emit ``d2a.adapter.promoted``; the promotions automation posts it. Never fails the run."""
    try:
        from prefect.events import emit_event

        emit_event(PROMOTED_EVENT,
                   resource={"prefect.resource.id": f"d2a.adapter.{p['run_id']}", "prefect.resource.name": p["run_id"],
                             "d2a.config": cfg.run_name},
                   payload={"reasons": p.get("reasons", []), "data_root": str(cfg.root)})
    except Exception as e:  # noqa: BLE001 - a notification is a courtesy, not part of the result
        log.warning("could not announce the promotion of %s: %s", p.get("run_id"), e)
