"""The kernel side: header discovery, preflight checks and the BCC engine. Only this
package imports bcc."""
