"""dualpar: block-wise pipelined long-video generation over frame blocks and DiT layers."""
