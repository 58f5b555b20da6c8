"""The tinymlaas web service (Flask REST API and MQTT coordination): translates HTTP/MQTT into core calls."""
