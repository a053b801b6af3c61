//! Process lifecycle shared by the Tenantry programs: the shutdown signals, and the pipe
//! by which a parent (the local provisioner, `tenantry-api dev`) keeps its children alive
//! only while it lives, even when it is killed with SIGKILL and cannot clean up.

use std::future::Future;

/// Completes on SIGINT (Ctrl-C) or SIGTERM. A signal that cannot be watched is logged and
/// then never completes, so the other still stops the program.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

/// Completes when standard input reaches its end or cannot be read: the parent holds the
/// write end of a pipe and never writes, so the end comes when the parent exits, however
/// it exits. The read blocks, so it runs on a thread of its own that the process does not
/// wait for at exit (a blocking read on tokio's pool would hold up a shutdown on SIGTERM).
///
/// # Errors
/// When the thread cannot be started.
pub fn stdin_closed() -> std::io::Result<impl Future<Output = ()>> {
    use std::io::Read as _;
    let (closed, on_close) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = closed.send(());
        })?;
    Ok(async move {
        // An error means the thread is gone without sending: treat it as closed too.
        let _ = on_close.await;
        tracing::info!("standard input closed (the parent is gone); shutting down");
    })
}

/// [`shutdown_signal`], or also [`stdin_closed`] when `exit_on_stdin_close`, whichever
/// comes first.
///
/// # Errors
/// When standard input cannot be watched.
pub fn shutdown(exit_on_stdin_close: bool) -> std::io::Result<impl Future<Output = ()>> {
    let parent_gone = if exit_on_stdin_close {
        Some(stdin_closed()?)
    } else {
        None
    };
    Ok(async move {
        match parent_gone {
            Some(parent_gone) => {
                tokio::select! {
                    () = shutdown_signal() => {}
                    () = parent_gone => {}
                }
            }
            None => shutdown_signal().await,
        }
    })
}
