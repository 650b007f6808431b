"""The kopf operator: quorum admission, recovery, calibration and the pod webhook."""
