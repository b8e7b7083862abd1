"""In-process simulators of ControlShift and Action Network, served over real HTTP for tests,
benchmarks and the demo."""
