"""What crosses the boundary between the controller and the daemons, beside the plans."""
