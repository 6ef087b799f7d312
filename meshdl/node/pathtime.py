"""How long a piece's bytes take along its route on a mesh's link figures (pure): the
sender's retransmission timer is priced with it (``node.dataplane``, ``node.flow``).

On a star (an MQTT broker) every hop a -> b crosses a's uplink, then b's downlink; on a
device-to-device mesh each hop is one link. ``first_up`` False leaves out the first
hop's sending side when the caller's timer starts after it (an emulated uplink paced
in the node); the kernel shaping a link (``--netns``) does not tell the node when its
bytes left, so there the first uplink counts (a piece put on a 4 Mbit/s uplink was
resent after 1 s wall, before it could have crossed; issue 11)."""
from __future__ import annotations

from typing import Any


def path_time(mesh: Any, path: list[str], nbytes: int, *, first_up: bool = True) -> float:
    """Seconds for ``nbytes`` along ``path`` (device ids) on ``mesh``'s figures; hops
    without figures cost nothing."""
    total, bits = 0.0, nbytes * 8.0
    star = mesh.star
    for i, (a, b) in enumerate(zip(path, path[1:])):
        if star is not None:
            up, down = star.link_of(a), star.link_of(b)
            if up is not None and (first_up or i > 0):
                total += up.latency_s + bits / up.up_bps
            if down is not None:
                total += down.latency_s + bits / down.down_bps
        elif (link := mesh.find_link(a, b)) is not None and (first_up or i > 0):
            total += link.latency_s + bits / link.bandwidth_bps
    return total
