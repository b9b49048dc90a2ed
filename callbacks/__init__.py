"""Lightning layer of stun-lightning (StunCallback and friends). Filled by the Lightning issue."""
