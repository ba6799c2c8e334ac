"""The pass model of ``fusedbn.bench``: the one definition of the bytes a mode moves.

The achieved bandwidth of a case is ``PASSES[mode] * numel * element_size``
bytes divided by the median time, the same byte count for every contender (an
*effective* bandwidth: it says how close a contender is to the minimal
unfused memory traffic, not what it really moved). One pass is one read or
one write of a full tensor:

* ``forward-train``    3 passes: read x (statistics), read x + write y;
* ``backward``         5 passes: read x and dy (reductions), read x and dy + write dx;
* ``forward+backward`` 8 passes: the two above;
* ``eval``             2 passes: read x, write y;
* ``copy``             2 passes: ``dst.copy_(src)``, read + write.

``% of copy`` is that bandwidth over the bandwidth of ``dst.copy_(src)`` on a
tensor of the same size, dtype and layout, timed in the same rounds as the
contenders. A fused kernel that keeps a channel in cache between its
statistics and its normalize pass moves fewer bytes than the model counts,
so it can exceed 100%.
"""

PASSES = {
    "forward-train": 3,
    "backward": 5,
    "forward+backward": 8,
    "eval": 2,
    "copy": 2,
}


def pass_bytes(mode, numel, element_size):
    """Bytes ``mode`` moves under the pass model for a tensor of ``numel`` elements."""
    return PASSES[mode] * numel * element_size
